"""LMDeploy >= 0.4 equivalents of our KV modes: the mapping (today's modes and properties of modes to come)
and ``python -m calib lmdeploy``."""

from dataclasses import dataclass

import pytest
import torch
from test_calib_cli import assert_one_line_error, run

from calib.lmdeploy import lmdeploy_equivalent
from kvcache.modes import KV_MODES, KVMode


@dataclass(frozen=True)
class FutureMode(KVMode):
    """A mode with the properties announced for later modes."""

    k_bits: int = 8
    v_bits: int = 8
    rotation: str | None = None
    group_size: int | None = None
    sink_tokens: int = 0
    symmetric: bool = False


def future(bits=8, **kw) -> FutureMode:
    kw = {"k_bits": bits, "v_bits": bits, **kw}
    return FutureMode("future", "a later mode", quantized=True, dynamic=True, needs_qparams=False, bits=bits, **kw)


def test_todays_modes():
    fp16, int8, dyn = (lmdeploy_equivalent(KV_MODES[n], "internlm/internlm2-chat-7b") for n in ("fp16", "int8", "int8-dynamic"))
    assert (fp16.exact, fp16.quant_policy, fp16.serve) == (True, 0, "lmdeploy serve api_server internlm/internlm2-chat-7b")
    assert (dyn.exact, dyn.quant_policy) == (True, 8)
    assert dyn.serve == "lmdeploy serve api_server internlm/internlm2-chat-7b --quant-policy 8"
    assert dyn.chat == "lmdeploy chat internlm/internlm2-chat-7b --quant-policy 8"
    assert "TurbomindEngineConfig(quant_policy=8)" in dyn.python
    assert (int8.exact, int8.quant_policy) == (False, 8) and "calibration" in int8.reason
    assert "\n" not in int8.reason
    assert lmdeploy_equivalent("int8-dynamic") == lmdeploy_equivalent(KV_MODES["int8-dynamic"])  # by name too


@pytest.mark.parametrize("mode, exact, policy, needle", [
    (future(bits=4), True, 4, ""),
    (future(k_bits=8, v_bits=4), False, 8, "different widths (8/4 bits)"),
    (future(rotation="hadamard"), False, 8, "rotates K/V (hadamard)"),
    (future(group_size=32), False, 8, "per group of 32 channels"),
    (future(sink_tokens=4), False, 8, "first tokens in fp16"),
    (future(symmetric=True), False, 8, "symmetric"),
    (future(bits=2), False, 4, "2-bit"),
    (future(bits=4, rotation="hadamard"), False, 4, "rotates"),
])
def test_properties_decide(mode, exact, policy, needle):
    eq = lmdeploy_equivalent(mode)
    assert (eq.exact, eq.quant_policy) == (exact, policy)
    assert needle in eq.reason and (eq.reason == "") == exact


def test_float_codes_have_no_equivalent():
    @dataclass(frozen=True)
    class FP8(KVMode):
        def data_dtype(self, fp_dtype=torch.float16):
            return torch.float8_e4m3fn

    eq = lmdeploy_equivalent(FP8("fp8", "fp8", quantized=True, dynamic=True, needs_qparams=False, bits=8))
    assert not eq.exact and "float8" in eq.reason


def test_cli_prints_the_command(capsys):
    rc, out, err = run(capsys, "lmdeploy", "--kv", "int8-dynamic", "--model", "/models/qwen")
    assert rc == 0, err
    assert out.splitlines()[0] == "int8-dynamic: LMDeploy >= 0.4 equivalent: online int8 (quant_policy 8)"
    assert "lmdeploy serve api_server /models/qwen --quant-policy 8" in out
    assert "lmdeploy chat /models/qwen --quant-policy 8" in out and "TurbomindEngineConfig(quant_policy=8)" in out


def test_cli_prints_the_reason_and_closest(capsys):
    rc, out, _ = run(capsys, "lmdeploy", "--kv", "int8")
    assert rc == 0
    first = out.splitlines()[0]
    assert first.startswith("int8: no LMDeploy >= 0.4 equivalent: ") and "closest: online int8 (quant_policy 8)" in first
    assert "lmdeploy serve api_server MODEL --quant-policy 8" in out


def test_cli_unknown_mode(capsys):
    rc, _, err = run(capsys, "lmdeploy", "--kv", "int3")
    assert rc == 2
    assert_one_line_error(err, "unknown KV mode 'int3'", "int8-dynamic")


def test_help_explains_the_old_quant_policy_4(capsys):
    with pytest.raises(SystemExit) as e:
        run(capsys, "lmdeploy", "--help")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for needle in ("quant_policy=4 changed in 0.4", "past_kv_scale", "--format turbomind", "kv_qparams --help",
                   "--quant-policy 8 = int8, 4 = int4"):
        assert needle in out, needle
