"""The ``tfcompile`` console script and the pass registry's discovery."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import onnx
import onnx.helper as oh
import pytest

from passes.framework import registry
from passes.framework.base import PassError
from passes.tools import cli

ROOT = Path(__file__).resolve().parents[1]


def _tiny(path: Path) -> Path:
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    nodes = [oh.make_node("Identity", ["x"], ["a"]), oh.make_node("Sigmoid", ["a"], ["s"]), oh.make_node("Mul", ["a", "s"], ["y"])]
    onnx.save(oh.make_model(oh.make_graph(nodes, "g", [x], [y]), opset_imports=[oh.make_opsetid("", 17)]), path)
    return path


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("compile", "export", "bench", "embed", "generate", "demo"):
        assert f"  {name} " in out


def test_unknown_subcommand_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'frobnicate'" in err[0]


def test_subcommand_help_is_the_module_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["compile", "--help"])
    assert "--target" in capsys.readouterr().out


def test_tfcompile_compile_equals_python_m_passes_compile(tmp_path: Path) -> None:
    src = _tiny(tmp_path / "m.onnx")
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    r1 = subprocess.run([sys.executable, "-m", "passes.tools.cli", "compile", str(src), "--target", "x86", "-o", str(a),
                         "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    r2 = subprocess.run([sys.executable, "-m", "passes.compile", str(src), "--target", "x86", "-o", str(b), "--quiet"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r1.returncode == r2.returncode == 0, r1.stderr + r2.stderr
    assert a.read_bytes() == b.read_bytes()
    assert [n.op_type for n in onnx.load(a).graph.node] == ["QuickGelu"]


def test_discovery_finds_every_pass_module() -> None:
    mods = registry.builtin_pass_modules()
    assert "passes.fusions.gelu" in mods and "passes.cleanup.dead_flow" in mods
    assert not any(m.rsplit(".", 1)[1].startswith("_") for m in mods)
    names = set(registry.registered_passes())
    assert {"dead-flow", "fold-constants", "simplify", "fuse-gelu", "fuse-layer-norm", "fuse-activations",
            "fuse-attention", "fuse-rotary", "fuse-embed-layer-norm", "quantize"} <= names


def test_a_pass_module_that_does_not_import_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "builtin_pass_modules", lambda: ["passes.fusions.no_such_module"])
    with pytest.raises(PassError, match="passes.fusions.no_such_module does not import"):
        registry.get_pass_class("dead-flow")
    monkeypatch.setattr(registry, "_LOADED", False)


def test_a_broken_plugin_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    class BadEntryPoint:
        name, value = "broken", "nowhere:Thing"

        def load(self) -> object:
            raise ImportError("No module named 'nowhere'")

    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [BadEntryPoint()])
    with pytest.raises(PassError, match="plugin broken .* does not import"):
        registry.registered_passes()
    monkeypatch.setattr(registry, "_LOADED", False)


def test_a_plugin_rule_becomes_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from passes import PatternRule

    rule = PatternRule("plugin-double-neg", lambda op, x: op.Neg(op.Neg(x)), lambda op, x: x)
    ep = types.SimpleNamespace(name="plugin-double-neg", value="pkg:rule", load=lambda: rule)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the plugin's pass goes with the test
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    assert "plugin-double-neg" in registry.registered_passes()
    monkeypatch.setattr(registry, "_LOADED", False)


def test_load_registers_a_users_rules_before_compiling(tmp_path: Path) -> None:
    rules = tmp_path / "my_rules.py"
    rules.write_text(
        "from passes import PatternRule, register_rules\n"
        "register_rules('fuse-my-silu', [PatternRule('my-silu', lambda op, x: op.Mul(x, op.Sigmoid(x)),\n"
        "    lambda op, x: op.QuickGelu(x, alpha=1.0, _domain='com.microsoft'))])\n")
    src, out = _tiny(tmp_path / "m.onnx"), tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-m", "passes.compile", str(src), "--load", str(rules), "--pipeline",
                           "dead-flow,simplify,fuse-my-silu", "-o", str(out), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [n.op_type for n in onnx.load(out).graph.node] == ["QuickGelu"]
    bad = subprocess.run([sys.executable, "-m", "passes.compile", str(src), "--load", str(tmp_path / "nope.py")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--load" in bad.stderr


def test_compiler_fingerprint_hashes_the_compilers_sources() -> None:
    import hashlib

    from passes.tools import autotune, embed

    # One function for both caches; by default it hashes this checkout's ir/, passes/ and targets/
    # (it once hashed an empty file list, so the caches never went stale).
    assert autotune.compiler_fingerprint is embed.compiler_fingerprint
    assert embed.compiler_fingerprint() != hashlib.sha256(b"").hexdigest()[:12]
    assert embed.compiler_fingerprint() == embed.compiler_fingerprint(ROOT)
