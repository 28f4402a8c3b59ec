"""Memory of the quantize passes' measurements: references spilled to disk score the same, calibration
batches stream, the compile report states the peak RSS.

The evaluator's scores are checked against the computation it replaced (every reference output held
in memory, scored by the code below, copied from the evaluator as it was) on tiny hand-built decoder,
encoder and generic models, with the references kept in memory and all spilled to disk.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from passes.framework.numerics import model_bytes_or_path
from passes.quantization._candidates import find_candidates
from passes.quantization._emit import Plan, apply_plan
from passes.quantization.calibration import Batches, calibration_batches
from passes.quantization.quant_math import cosine_rows
from passes.quantization.sensitivity import Evaluator, Score
from tests.conftest import ort_session

VOCAB, HIDDEN = 97, 24


def _model(kind: str, tmp_path: pathlib.Path) -> pathlib.Path:
    """input_ids (+ attention_mask) -> Gather -> MatMul -> Tanh -> MatMul: ``logits`` (decoder),
    ``last_hidden_state`` (encoder) or ``out`` (generic), plus an int64 output the evaluator skips."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    w1 = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((HIDDEN, VOCAB if kind == "decoder" else HIDDEN)).astype(np.float32) * 0.3
    name = {"decoder": "logits", "encoder": "last_hidden_state", "generic": "out"}[kind]
    width = VOCAB if kind == "decoder" else HIDDEN
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w1"], ["h"], name="mm1"),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("MatMul", ["t", "w2"], [name], name="mm2"),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    if kind != "generic":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]))
        nodes.append(helper.make_node("Identity", ["attention_mask"], ["mask_out"]))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "sequence", width]),
               helper.make_tensor_value_info("ids_shape", TensorProto.INT64, [2])]
    if kind != "generic":
        outputs.append(helper.make_tensor_value_info("mask_out", TensorProto.INT64, ["batch", "sequence"]))
    g = helper.make_graph(nodes, kind, inputs, outputs,
                          [numpy_helper.from_array(a, n) for a, n in ((emb, "emb"), (w1, "w1"), (w2, "w2"))])
    path = tmp_path / f"{kind}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _old_score(ev_batches: list, refs: list, kinds: list, names: list, mask_name: str | None, sess) -> Score:
    """The evaluator's score as it was before references could be spilled (the oracle)."""

    def _pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
        m = mask.astype(np.float64)[..., None]
        return (h.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)

    primary, hidden = [], []
    agree_num = agree_den = 0
    for feeds, ref_outs in zip(ev_batches, refs):
        outs = sess.run(names, feeds)
        mask = feeds.get(mask_name) if mask_name else None
        p_rows, h_rows = [], []
        for kind, ref, got in zip(kinds, ref_outs, outs):
            if kind == "skip":
                continue
            n = ref.shape[0] if ref.ndim else 1
            if kind in ("encoder", "decoder") and mask is not None and mask.shape == ref.shape[:2]:
                m = mask.astype(bool)
                hid = np.array([cosine_rows(ref[i][m[i]].reshape(1, -1), got[i][m[i]].reshape(1, -1))[0]
                                for i in range(n)])
            else:
                m = None
                hid = cosine_rows(ref.reshape(n, -1), got.reshape(n, -1))
            p_rows.append(cosine_rows(_pool(ref, m), _pool(got, m)) if kind == "encoder" and m is not None else hid)
            h_rows.append(hid)
            if kind == "decoder":
                sel = m if m is not None else np.ones(ref.shape[:2], bool)
                agree_num += int((ref.argmax(-1) == got.argmax(-1))[sel].sum())
                agree_den += int(sel.sum())
        primary.append(np.min(np.stack(p_rows), axis=0))
        hidden.append(np.min(np.stack(h_rows), axis=0))
    p, h = np.concatenate(primary), np.concatenate(hidden)
    return Score(worst=float(p.min()), mean=float(p.mean()), hidden_worst=float(h.min()),
                 agreement=agree_num / agree_den if agree_den else 1.0,
                 batch_worst=tuple(float(b.min()) for b in primary))


@pytest.mark.parametrize("kind", ["decoder", "encoder", "generic"])
def test_spilled_references_score_as_the_old_computation(kind: str, tmp_path: pathlib.Path) -> None:
    """Same Score (every field, bit for bit) with the references in memory, all on disk, and as the old
    code computed it; the spill folder is removed on close; int outputs are not kept."""
    path = _model(kind, tmp_path)
    model = ir.load(str(path))
    meta = ort_session(path).get_inputs()
    calib = calibration_batches(model, meta, limit=24, batch=4)
    assert isinstance(calib.batches, Batches) and len(calib.batches) == 6
    resident = Evaluator(str(path), calib.batches)
    spilled = Evaluator(str(path), calib.batches, resident_bytes=0)
    assert resident._store.spilled == 0 and spilled._store.spilled == 6
    folder = spilled._store._folder
    assert folder is not None and len(os.listdir(folder)) == 6
    assert resident.kinds == spilled.kinds and resident.kinds[0] == (kind if kind != "generic" else "generic")
    assert all(k == "skip" for k in resident.kinds[1:])
    assert all(r is None for refs in resident.reference for r in refs[1:])  # the skipped outputs are not kept

    cands = find_candidates(model, ("MatMul",))
    apply_plan(model, cands, Plan(frozenset(c.index for c in cands), False, False, True, "integer-ops"))
    src = model_bytes_or_path(model)[0]
    sess = ort_session(src)
    float_sess = ort_session(path)
    names = [o.name for o in float_sess.get_outputs()]
    full_refs = [float_sess.run(None, b) for b in calib.batches]
    old = _old_score(list(calib.batches), full_refs, resident.kinds, names, resident.mask_name, sess)
    assert old.worst < 0.99999  # the candidate differs from the float model: the scores are not all 1
    for ev in (resident, spilled):
        new = ev.score(src)
        assert (new.worst, new.mean, new.hidden_worst, new.agreement, new.batch_worst) == \
            (old.worst, old.mean, old.hidden_worst, old.agreement, old.batch_worst)
    hard = spilled.hardest(spilled.score(src), 2)
    assert hard is not None and len(hard.batches) == 2
    assert hard.score(src).worst == pytest.approx(old.worst, abs=0.0)  # the worst batches are in it
    spilled.close()
    assert not os.path.exists(folder)


def test_generated_calibration_is_made_per_batch_and_kept_under_a_budget() -> None:
    """A lazy Batches makes batch i when read; under the byte budget it keeps it (same object next
    time), over it makes it again each read (streaming) with the same content."""
    made: list[int] = []

    def make(i: int) -> dict[str, np.ndarray]:
        made.append(i)
        return {"x": np.full((4, 1000), i, np.float32)}  # 16 kB a batch

    kept = Batches(5, make)
    assert made == []  # nothing made up front
    first = kept[3]
    assert made == [3] and kept[3] is first and made == [3]
    streamed = Batches(5, make, keep_bytes=20_000)  # room for one batch
    a, b = streamed[0], streamed[1]
    assert streamed[0] is a and streamed[1] is not b and np.array_equal(streamed[1]["x"], b["x"])
    assert streamed.made == 4 and len(list(streamed)) == 5 and streamed[1:3][0]["x"][0, 0] == 1
    with pytest.raises(IndexError):
        streamed[5]


def test_npz_calibration_casts_one_batch_at_a_time(tmp_path: pathlib.Path) -> None:
    """Arrays of an .npz are cut and cast to the model's input types per batch, as the old eager
    split did (same values, same batch boundaries, the limit respected)."""
    path = _model("generic", tmp_path)
    meta = ort_session(path).get_inputs()
    ids = np.arange(30 * 5, dtype=np.int32).reshape(30, 5) % VOCAB
    np.savez(tmp_path / "c.npz", input_ids=ids)
    calib = calibration_batches(None, meta, calibration=str(tmp_path / "c.npz"), limit=20, batch=8)
    got = list(calib.batches)
    assert [len(b["input_ids"]) for b in got] == [8, 8, 4] and calib.samples == 20
    assert all(b["input_ids"].dtype == np.int64 for b in got)
    assert np.array_equal(np.concatenate([b["input_ids"] for b in got]), ids[:20].astype(np.int64))


def test_compile_report_states_the_peak_rss(tmp_path: pathlib.Path) -> None:
    """Every phase's peak RSS is measured (positive, below the machine's memory) and the report has
    the ``quantize-weights: peak RSS`` line and the JSON field."""
    from passes import compile_model

    path = _model("decoder", tmp_path)
    res = compile_model(str(path), "x86", "quantize-weights{bits=4,min_cosine=0.5}")
    rss = res.report.peak_rss
    assert list(rss) == ["load", "passes", "verify"]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert all(10 << 20 < v < total for v in rss.values()), rss
    assert rss["load"] <= rss["passes"] <= rss["verify"]  # peaks so far: never reset (ru_maxrss stays true)
    from passes.tools._memory import PeakRSS

    with open("/proc/self/status") as f:
        now = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    ballast = np.ones(200 << 20, np.uint8)  # 200 MB touched: the high-water mark follows
    assert PeakRSS.peak() >= now + (150 << 20)
    del ballast
    text = res.report.format()
    assert "quantize-weights: peak RSS " in text and f"passes {rss['passes'] / 2**30:.2f} GB" in text
    assert res.report.to_dict()["peak_rss_mb"]["passes"] == round(rss["passes"] / 2**20, 1)


def test_models_over_the_file_threshold_reach_onnxruntime_through_a_removed_file(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An IR model above FILE_BYTES is saved with external data for its session (the folder removed
    once the session is built) and scores exactly as the same model passed as bytes."""
    import tempfile

    from passes.quantization import sensitivity

    path = _model("decoder", tmp_path)
    model = ir.load(str(path))
    meta = ort_session(path).get_inputs()
    batches = calibration_batches(model, meta, limit=16, batch=8).batches
    cands = find_candidates(model, ("MatMul",))
    quant = ir.load(str(path))
    apply_plan(quant, find_candidates(quant, ("MatMul",)),
               Plan(frozenset(c.index for c in cands), False, False, True, "integer-ops"))
    by_bytes = Evaluator(str(path), batches).score(model_bytes_or_path(quant)[0])
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args: object, **kwargs: object) -> str:
        made.append(real_mkdtemp(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(sensitivity, "FILE_BYTES", 0)
    monkeypatch.setattr(sensitivity.tempfile, "mkdtemp", mkdtemp)
    ev = Evaluator(model, batches)  # the float model as IR: through a file too
    by_file = ev.score_model(quant)
    assert len(made) == 2 and not any(os.path.exists(d) for d in made)
    assert (by_file.worst, by_file.mean, by_file.batch_worst) == (by_bytes.worst, by_bytes.mean, by_bytes.batch_worst)


def test_the_float_session_is_freed_once_the_references_are_taken(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lazy batches keep their input metadata: as plain copies, not onnxruntime NodeArgs (which
    keep their session alive), so the float model's session is gone once the evaluator is built."""
    import gc
    import weakref

    from passes.quantization import sensitivity

    made: list[weakref.ref] = []
    real = sensitivity.session

    def recording(*args: object, **kwargs: object) -> object:
        s = real(*args, **kwargs)  # type: ignore[arg-type]
        made.append(weakref.ref(s._sess))  # the C++ session the wrapper holds (NodeArgs keep it alive)
        return s

    monkeypatch.setattr(sensitivity, "session", recording)
    path = _model("decoder", tmp_path)
    model = ir.load(str(path))
    ev = Evaluator(model, lambda meta: calibration_batches(model, meta, limit=16, batch=8).batches)
    gc.collect()
    assert len(made) == 1 and made[0]() is None
    assert len(ev.batches) == 2 and ev.batches[1]["input_ids"].shape == (8, 32)  # still made from the metadata


def test_the_probe_runs_without_a_switch_session_beside_it(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big model's probe (``ranking=local``) is built once no switch session is alive: the last
    remedy's session, when it won, is released first (on a 1.1 B Llama both at once held 17.5 GB)."""
    import gc
    import weakref

    import targets
    from passes import PassContext, PassManager
    from passes.quantization import quantize, sensitivity

    made: list[weakref.ref] = []
    real_session, real_local = sensitivity.session, quantize.local_errors
    alive_at_probe: list[int] = []

    def recording(*args: object, **kwargs: object) -> object:
        s = real_session(*args, **kwargs)  # type: ignore[arg-type]
        made.append(weakref.ref(s._sess))
        return s

    def probing(*args: object, **kwargs: object) -> object:
        gc.collect()
        alive_at_probe.append(sum(r() is not None for r in made))
        return real_local(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sensitivity, "session", recording)
    monkeypatch.setattr(quantize, "local_errors", probing)
    monkeypatch.setattr(quantize, "FILE_BYTES", 0)  # treated as big: the best switch session is not kept
    # one remedy: it is the best and the last, the case whose session outlived the remedies
    monkeypatch.setattr(quantize.QuantizePass, "_variants",
                        lambda self, model, ev, cands, base: [("per-channel", base)])
    model = ir.load(str(_model("decoder", tmp_path)))
    PassManager("quantize{ranking=local,min_cosine=0.9}").run(model, PassContext(target=targets.get("x86-avx2")))
    assert alive_at_probe == [0]
