"""Progress bars of long passes: through ``PassContext.bar``, advanced once a step, closed, off by default."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

import ir
import targets
from passes.framework.base import PassContext
from passes.framework.manager import PassManager
from tests.test_quantize_memory import _model


class FakeBars:
    """A bar factory that records every bar: its description, total, updates and whether it closed."""

    def __init__(self) -> None:
        self.bars: list[dict[str, Any]] = []

    def __call__(self, *, total: int, desc: str) -> Any:
        rec = {"desc": desc, "total": total, "n": 0, "closed": False, "postfix": ""}
        self.bars.append(rec)

        class Bar:
            def update(self, n: int = 1) -> None:
                assert not rec["closed"], "update after close"
                rec["n"] += n

            def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
                rec["postfix"] = s

            def close(self) -> None:
                rec["closed"] = True

        return Bar()

    def named(self, prefix: str) -> list[dict[str, Any]]:
        return [b for b in self.bars if b["desc"].startswith(prefix)]


def test_context_bar_is_a_no_op_without_a_factory_and_closes_on_error() -> None:
    ctx = PassContext()
    with ctx.bar(3, "nothing") as bar:  # no factory: nothing happens, nothing fails
        bar.update()
        bar.set_postfix_str("x")
    fake = FakeBars()
    ctx = PassContext(progress_bar=fake)
    with pytest.raises(RuntimeError), ctx.bar(2, "work") as bar:
        bar.update()
        raise RuntimeError("boom")
    assert fake.bars == [{"desc": "work", "total": 2, "n": 1, "closed": True, "postfix": ""}]


def test_weight_only_measurements_advance_their_bars(tmp_path: pathlib.Path) -> None:
    """quantize-weights with a budget the int4 model misses: the calibration bar counts every batch, the
    ops-alone bar every op, the subsets bar every trial; every bar is closed."""
    model = ir.load(str(_model("decoder", tmp_path)))
    fake = FakeBars()
    ctx = PassContext(target=targets.get("x86"), progress_bar=fake)
    PassManager("quantize-weights{bits=4,min_cosine=0.99999,max_calibration=16}").run(model, ctx)
    calib = fake.named("calibrating")
    assert len(calib) == 1 and calib[0]["n"] == calib[0]["total"] == 2  # 16 samples in batches of 8
    alone = fake.named("quantize-weights: ops alone at int4")
    assert len(alone) == 1 and alone[0]["n"] == alone[0]["total"] == 2  # mm1, mm2
    subsets = fake.named("quantize-weights: subsets tried")
    assert subsets and all(1 <= b["n"] <= b["total"] for b in subsets)
    assert all(b["closed"] for b in fake.bars)


def test_quantize_sensitivity_advances_its_bars(tmp_path: pathlib.Path) -> None:
    """The int8 quantize pass under a budget that the fully quantized model misses: remedies, ops alone
    and subsets each get a bar that reaches the number of steps done."""
    model = ir.load(str(_model("decoder", tmp_path)))
    fake = FakeBars()
    ctx = PassContext(target=targets.get("x86"), progress_bar=fake)
    PassManager("quantize{min_cosine=0.99999,max_calibration=16,smooth=off,outliers=off}").run(model, ctx)
    assert [b["n"] for b in fake.named("calibrating")] == [2]
    remedies = fake.named("quantize: remedies")
    assert len(remedies) == 1 and remedies[0]["n"] == remedies[0]["total"] == 1
    alone = fake.named("quantize: ops alone")
    assert len(alone) == 1 and alone[0]["n"] == alone[0]["total"] == 2
    assert all(b["closed"] and b["n"] <= b["total"] for b in fake.bars)


def test_command_line_shows_no_bar_when_stderr_is_not_a_terminal(tmp_path: pathlib.Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Under pytest stderr is captured (not a TTY): the progress lines come, no tqdm bar is drawn."""
    from passes.tools.compile import main

    path = _model("decoder", tmp_path)
    rc = main([str(path), "--pipeline", "quantize-weights{bits=4,min_cosine=0.99999,max_calibration=16}",
               "-o", str(tmp_path / "out.onnx"), "--force"])
    err = capsys.readouterr().err
    assert rc in (0, 1) and "compile: running quantize-weights" in err
    assert "it/s" not in err and "\r" not in err  # tqdm's rate and carriage returns


def test_tqdm_bars_draw_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """The command line's factory is a tqdm on stderr (forced on here: it is autotune's helper)."""
    from passes.tools.compile import tqdm_bars

    bar = tqdm_bars(total=4, desc="probe")
    bar.update(2)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == "" and "probe" in captured.err
