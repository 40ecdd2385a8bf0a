"""LMDeploy >= 0.4 equivalents of our KV modes: the mapping (today's modes and properties of modes to come)
and ``python -m calib lmdeploy``."""

import pytest
from test_calib_cli import assert_one_line_error, run

from calib.lmdeploy import lmdeploy_equivalent
from kvcache.modes import INT8_TOKEN, KV_MODES, Codec, KVMode


def mode(k: Codec = INT8_TOKEN, v: Codec | None = None, **kw) -> KVMode:
    return KVMode("m", "a mode built from codecs", k, v or k, **kw)


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
    lmd = lmdeploy_equivalent("int4-lmdeploy")  # the mode that reproduces LMDeploy's int4 is exactly it
    assert (lmd.exact, lmd.quant_policy) == (True, 4)
    for name in ("int8-rot", "int8-qk", "k8v4", "int4"):  # ours go beyond what quant_policy can say
        assert not lmdeploy_equivalent(name).exact, name


INT4 = Codec(4, "token")


@pytest.mark.parametrize("m, exact, policy, needle", [
    (mode(INT4), True, 4, ""),
    (mode(INT8_TOKEN, INT4), False, 8, "different widths (8/4 bits)"),
    (mode(Codec(8, "token", rotate=True)), False, 8, "rotates K/V (Hadamard)"),
    (mode(Codec(8, "token", group_size=32)), False, 8, "per group of channels"),
    (mode(sink_tokens=4), False, 8, "first 4 tokens in fp16"),
    (mode(Codec(8, "token", symmetric=True)), False, 8, "symmetric"),
    (mode(Codec(4, "token", rotate=True)), False, 4, "rotates"),
    (mode(Codec(8, "token", qk_transform=True)), False, 8, "query-aware transform"),
    (KVMode("plan", "a plan", layers=((INT8_TOKEN, INT8_TOKEN), (INT4, INT4))), False, 8, "differ from layer to layer"),
])
def test_properties_decide(m, exact, policy, needle):
    eq = lmdeploy_equivalent(m)
    assert (eq.exact, eq.quant_policy) == (exact, policy)
    assert needle in eq.reason and (eq.reason == "") == exact


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
    rc, _, err = run(capsys, "lmdeploy", "--kv", "int5")
    assert rc == 2
    assert_one_line_error(err, "unknown KV mode 'int5'", "int8-dynamic")


def test_help_explains_the_old_quant_policy_4(capsys):
    with pytest.raises(SystemExit) as e:
        run(capsys, "lmdeploy", "--help")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for needle in ("quant_policy=4 changed in 0.4", "past_kv_scale", "--format turbomind", "kv_qparams --help",
                   "--quant-policy 8 = int8, 4 = int4"):
        assert needle in out, needle
