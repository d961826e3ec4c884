"""python -m fan_jax.summary: parameter counts against hand counts and the paper's ranges."""

import json
import subprocess
import sys

from fan_jax import summary


def _decoder_params(cin, ch, k, num_landmarks):
    # 3 x (deconv without bias + BN scale/bias) + 1x1 head with bias.
    convs = cin * ch * k * k + 2 * ch * ch * k * k
    return convs + 3 * 2 * ch + ch * num_landmarks + num_landmarks


def test_counts_match_hand_counts():
    rows = {r["name"]: r for r in map(summary.model_summary, ("mobilefan", "mobilefan_0.5"))}
    # Both share the encoder, so their difference is the decoder's alone.
    diff = rows["mobilefan"]["params"] - rows["mobilefan_0.5"]["params"]
    assert diff == _decoder_params(320, 128, 2, 98) - _decoder_params(320, 64, 2, 98)
    assert 1.9e6 <= rows["mobilefan"]["params"] <= 2.2e6
    # A 256x256 MobileNetV2 stack is ~0.4 GMACs; the decoder adds little.
    assert 0.5e9 < rows["mobilefan"]["flops"] < 2.0e9
    assert rows["mobilefan_0.5"]["flops"] < rows["mobilefan"]["flops"]


def test_cli_json_lists_the_three_models():
    out = subprocess.run(
        [sys.executable, "-m", "fan_jax.summary", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["mobilefan", "mobilefan_0.5", "teacher"]
    assert all(set(r) == {"name", "params", "flops"} for r in rows)
    teacher = rows[2]
    assert 33e6 <= teacher["params"] <= 36e6
    # ResNet-50 encoder 23.5M + decoder 2048*256*16 + 2*256*256*16 + BN + head.
    assert teacher["params"] == 23_534_592 + _decoder_params(2048, 256, 4, 98)
