"""Target profiles are data; passes read capabilities, never names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import targets
from passes import parse_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_targets_load_and_their_pipelines_parse() -> None:
    all_t = targets.all_targets()
    assert {"x86-avx512vnni", "x86-avx2", "arm64", "onnx"} <= set(all_t)
    for t in all_t.values():
        parse_pipeline(t.pipeline)
        parse_pipeline(t.quantize_pipeline)
        assert t.quantization.format in ("integer-ops", "qdq")


def test_aliases_and_native() -> None:
    assert targets.get("x86").name == "x86-avx512vnni"
    assert targets.get("aarch64").name == "arm64"
    assert targets.native_name({"avx2", "fma"}, "x86_64") == "x86-avx2"
    assert targets.native_name({"avx2", "avx512_vnni"}, "x86_64") == "x86-avx512vnni"
    assert targets.native_name({"asimd", "asimddp"}, "aarch64") == "arm64"
    assert targets.native_name(set(), "riscv64") == "onnx"
    assert targets.get("native").name in targets.all_targets()


def test_unknown_target_lists_known_ones() -> None:
    with pytest.raises(targets.TargetError, match="unknown target 'tpu'.*x86-avx2"):
        targets.get("tpu")


def test_capabilities() -> None:
    x86, onnx_t = targets.get("x86"), targets.get("onnx")
    assert x86.supports("Attention", "com.microsoft") and not onnx_t.supports("Attention", "com.microsoft")
    assert onnx_t.supports("LayerNormalization") and not onnx_t.supports("Foo", "my.domain")
    assert targets.get("x86-avx2").quantization.reduce_range and not x86.quantization.reduce_range


def test_a_new_target_is_a_new_file(tmp_path, monkeypatch) -> None:
    (tmp_path / "tiny.toml").write_text(
        'name = "tiny-npu"\ndescription = "test"\ncontrib_ops = ["Gelu"]\npipeline = "dead-flow"\n'
        '[quantization]\nops = ["MatMul"]\nformat = "qdq"\n'
    )
    monkeypatch.setenv("TFCOMPILE_TARGETS_DIR", str(tmp_path))
    targets.all_targets.cache_clear()
    try:
        t = targets.get("tiny-npu")
        assert t.supports("Gelu", "com.microsoft") and not t.supports("Attention", "com.microsoft")
        assert t.quantization.format == "qdq"
    finally:
        targets.all_targets.cache_clear()


def test_a_bad_residual_layer_norm_value_is_refused(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\ndescription = "test"\nresidual_layer_norm = "fused"\n')
    with pytest.raises(targets.TargetError, match="residual_layer_norm must be"):
        targets.load_target_file(path)
    assert targets.get("x86").residual_layer_norm == "sum" and targets.get("onnx").residual_layer_norm == "skip"


def test_passes_never_branch_on_a_target_name() -> None:
    names = set()
    for t in targets.all_targets().values():
        names.add(t.name)
        names.update(t.aliases)
    offenders = []
    for path in sorted((ROOT / "passes").glob("*.py")):
        if path.name in ("compile.py", "bench.py", "embed.py", "demo.py", "generate.py", "export.py"):
            continue  # commands take a target name from the user; passes must not
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "name" and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "target":
                offenders.append(f"{path.name}:{node.lineno} reads target.name")
            if isinstance(node, ast.Compare):
                for part in (node.left, *node.comparators):
                    consts = part.elts if isinstance(part, (ast.Tuple, ast.List, ast.Set)) else [part]
                    for c in consts:
                        if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value in names:
                            offenders.append(f"{path.name}:{node.lineno} compares with target name {c.value!r}")
    assert not offenders, offenders


def test_profiles_are_the_only_place_targets_are_defined() -> None:
    toml_names = {p.stem for p in (ROOT / "targets" / "profiles").glob("*.toml")}
    assert toml_names == set(targets.all_targets())
    src = (ROOT / "targets" / "__init__.py").read_text() + (ROOT / "targets" / "_target.py").read_text()
    assert not re.search(r'"(x86-avx2|x86-avx512vnni|arm64|onnx)"', src)
