"""The n-gram sketch that tells an evaluation whether its text overlaps the calibration text."""

import torch

from kvcache.measure.overlap import (
    NGRAM,
    containment,
    ngram_sketch,
    sketch_from_text,
    sketch_to_text,
)


def rows(seed: int, n: int = 8, length: int = 600) -> torch.Tensor:
    return torch.randint(0, 50_000, (n, length), generator=torch.Generator().manual_seed(seed))


def test_small_text_is_sketched_exactly():
    calib = rows(0, n=1, length=200)
    sketch = ngram_sketch(calib)
    assert sketch["distinct"] == 200 - NGRAM + 1 == len(sketch["hashes"])
    same = containment(sketch, calib)
    assert same.exact and same.share == 1.0
    assert containment(sketch, rows(1, n=1, length=200)).share == 0.0


def test_containment_is_estimated_from_the_sketch():
    calib = rows(0)  # 8 x 600 tokens: ~4,600 distinct n-grams, more than the sketch keeps
    sketch = ngram_sketch(calib, k=512)
    assert len(sketch["hashes"]) == 512 and sketch["distinct"] > 4000
    other = rows(1)
    assert containment(sketch, other).share == 0.0
    half = torch.cat([calib[:4], other[:4]])  # half the text was seen in calibration
    est = containment(sketch, half)
    assert not est.exact and est.sampled > 100
    assert 0.35 < est.share < 0.65, est
    assert containment(sketch, calib).share == 1.0


def test_sketch_survives_metadata_strings():
    sketch = ngram_sketch(rows(2, n=2))
    assert sketch_from_text(sketch_to_text(sketch)) == sketch
    assert sketch_from_text(None) is None and sketch_from_text("{not json") is None and sketch_from_text("[1]") is None
    assert containment(sketch, [[1, 2, 3]]) is None  # shorter than one n-gram: nothing to sample
