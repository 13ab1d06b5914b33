"""Benchmark: amq.quantize against onnxruntime.quantization.quantize_static.

Usage (from the repository root):
    python bench/bench_quantize.py                 # full run (~8-10 min on 2 cores), rewrites bench/RESULTS.md
    python bench/bench_quantize.py --amq-rev HEAD  # the same with amq/ as committed (a git archive in a
                                                   # temp dir): others may be editing the work tree
    python bench/bench_quantize.py --quick         # smoke test (about 1 min), prints the report only
    python bench/bench_quantize.py --out FILE      # write the report to FILE instead

What it measures, side by side in one run (the machine is noisy: read the ratios, not the seconds):
  1. accuracy: the bundled digits CNN (top-1 on eval_data/) and a ResNet-18-shaped CNN at 224x224
     built here with onnx.helper (output SQNR and cosine vs float on held-out samples), for amq and
     for onnxruntime's quantize_static with the same samples and the same range method (minmax, and
     percentile with the same tail mass per side);
  2. wall time, CPU time and peak RSS of amq.quantize vs quant_pre_process + quantize_static, the
     time of amq's calibration pass alone (runner.collect_stats, split into onnxruntime runs and
     observer updates by small wrappers) and of plain float inference over the same samples (one
     ORT session, batch 16);
  3. amq's peak RSS with 1024 vs 64 calibration samples (one memory-mapped .npy on disk);
  4. where amq's time goes: cProfile, and py-spy --native when py-spy is installed (full run only);
  5. the cost per value of amq's observers, and of variants of them, on the tensors it observes;
  6. the least that calibrating the bundled model can cost: float inference, then the same run
     with the observed tensors exposed, then a bare min/max of them, then amq's pass.

Every configuration runs in a fresh subprocess of this script (``--child SPEC``); its peak RSS is
the ``ru_maxrss`` that ``os.wait4`` returns for that child (the parent stays small: on Linux a
child's ru_maxrss also counts the parent it was forked from). The child also samples
/proc/self/status so the peak can be split into anonymous memory and mapped files.
When the report file exists, everything after NOTES_MARKER in it (hand-written notes) is kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
AMQ_SRC: dict[str, str | None] = {"path": None}  # set by --amq-rev
NOTES_MARKER = "<!-- hand-written notes: everything below this line is kept when the script rewrites the file -->"


def write_keeping_notes(path: Path, text: str) -> None:
    """Write a generated report; hand-written notes after NOTES_MARKER in the old file survive."""
    kept = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if NOTES_MARKER in old:
            kept = old[old.index(NOTES_MARKER) :]
    path.write_text(text + ("\n" + kept if kept else ""), encoding="utf-8")


BATCH = 16
HW = 224


# ---------------------------------------------------------------------------------------------
# Models and data


def build_resnet18(path: Path, seed: int = 0, stat_samples: np.ndarray | None = None) -> None:
    """A ResNet-18-shaped CNN (torch-export-like names, unfused BatchNormalization, dynamic batch,
    input 'input' [N,3,224,224], output 'logits' [N,1000]). He-init weights, random BN gamma/beta.
    With ``stat_samples`` the BN running statistics are the batch statistics of those samples
    (one pass of a train-mode copy of the graph), then perturbed; and the classifier is centred
    and scaled on them, so that the logits depend on the input (a random deep ReLU net otherwise
    gives nearly the same logits for every input)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    layers: list = []  # onnx nodes, or ("bn", param prefix, input, output, node name)
    inits: dict[str, np.ndarray] = {}

    def conv_bn(x: str, scope: str, conv: str, bn: str, cin: int, cout: int, k: int, s: int) -> str:
        w = rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        inits[f"{conv}.weight"] = w.astype(np.float32)
        c_out = f"{scope}/{conv.split('.')[-1]}/Conv_output_0"
        layers.append(
            helper.make_node(
                "Conv",
                [x, f"{conv}.weight"],
                [c_out],
                name=f"{scope}/{conv.split('.')[-1]}/Conv",
                kernel_shape=[k, k],
                strides=[s, s],
                pads=[k // 2] * 4,
            )
        )
        gamma = np.exp(rng.normal(0.0, 0.35, cout))
        if bn.endswith(("bn2", "downsample.1")):
            gamma *= 0.5  # residual branches: smaller, as in trained ResNets
        inits[f"{bn}.weight"] = gamma.astype(np.float32)
        inits[f"{bn}.bias"] = rng.normal(0.0, 0.15, cout).astype(np.float32)
        inits[f"{bn}.running_mean"] = np.zeros(cout, np.float32)
        inits[f"{bn}.running_var"] = np.ones(cout, np.float32)
        short = bn.split(".")[-1]
        b_out = f"{scope}/{short}/BatchNormalization_output_0"
        layers.append(("bn", bn, c_out, b_out, f"{scope}/{short}/BatchNormalization"))
        return b_out

    def relu(x: str, name: str) -> str:
        layers.append(helper.make_node("Relu", [x], [f"{name}_output_0"], name=name))
        return f"{name}_output_0"

    x = relu(conv_bn("input", "", "conv1", "bn1", 3, 64, 7, 2), "/relu/Relu")
    layers.append(
        helper.make_node(
            "MaxPool",
            [x],
            ["/maxpool/MaxPool_output_0"],
            name="/maxpool/MaxPool",
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        )
    )
    x, cin = "/maxpool/MaxPool_output_0", 64
    for li, width in enumerate((64, 128, 256, 512), start=1):
        for bi in range(2):
            stride = 2 if (li > 1 and bi == 0) else 1
            p, scope = f"layer{li}.{bi}", f"/layer{li}/layer{li}.{bi}"
            y = relu(
                conv_bn(x, scope, f"{p}.conv1", f"{p}.bn1", cin, width, 3, stride),
                f"{scope}/relu/Relu",
            )
            y = conv_bn(y, scope, f"{p}.conv2", f"{p}.bn2", width, width, 3, 1)
            if stride != 1 or cin != width:
                ds = f"{p}.downsample"
                x = conv_bn(x, f"{scope}/downsample", f"{ds}.0", f"{ds}.1", cin, width, 1, stride)
            layers.append(
                helper.make_node("Add", [y, x], [f"{scope}/Add_output_0"], name=f"{scope}/Add")
            )
            x, cin = relu(f"{scope}/Add_output_0", f"{scope}/relu_1/Relu"), width
    gap = "/avgpool/GlobalAveragePool_output_0"
    layers.append(
        helper.make_node("GlobalAveragePool", [x], [gap], name="/avgpool/GlobalAveragePool")
    )
    layers.append(
        helper.make_node("Flatten", [gap], ["/Flatten_output_0"], name="/Flatten", axis=1)
    )
    inits["fc.weight"] = (rng.standard_normal((1000, 512)) * np.sqrt(1.0 / 512)).astype(np.float32)
    inits["fc.bias"] = np.zeros(1000, np.float32)
    layers.append(
        helper.make_node(
            "Gemm",
            ["/Flatten_output_0", "fc.weight", "fc.bias"],
            ["logits"],
            name="/fc/Gemm",
            transB=1,
        )
    )

    def make(train: bool = False, extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
        nodes, outs = [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])]
        for layer in layers:
            if not isinstance(layer, tuple):
                nodes.append(layer)
                continue
            _, bn, c, y, name = layer
            if not train:
                ins = [f"{bn}.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
                nodes.append(
                    helper.make_node("BatchNormalization", [c, *ins], [y], name=name, epsilon=1e-5)
                )
                continue
            # train mode: normalise with this batch's statistics and output them
            t = f"{name}/train"
            nodes += [
                helper.make_node("ReduceMean", [c], [f"{t}/mean"], axes=[0, 2, 3], keepdims=1),
                helper.make_node("Sub", [c, f"{t}/mean"], [f"{t}/d"]),
                helper.make_node("Mul", [f"{t}/d", f"{t}/d"], [f"{t}/d2"]),
                helper.make_node(
                    "ReduceMean", [f"{t}/d2"], [f"{t}/var"], axes=[0, 2, 3], keepdims=1
                ),
                helper.make_node("Add", [f"{t}/var", "train.eps"], [f"{t}/v"]),
                helper.make_node("Sqrt", [f"{t}/v"], [f"{t}/std"]),
                helper.make_node("Div", [f"{t}/d", f"{t}/std"], [f"{t}/n"]),
                helper.make_node("Mul", [f"{t}/n", f"{t}/gamma"], [f"{t}/g"]),
                helper.make_node("Add", [f"{t}/g", f"{t}/beta"], [y]),
            ]
            outs += [
                helper.make_tensor_value_info(f"{t}/{s}", TensorProto.FLOAT, None)
                for s in ("mean", "var")
            ]
        outs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in extra_outputs]
        tensors = dict(inits)
        if train:
            tensors["train.eps"] = np.array(1e-5, np.float32)
            for layer in layers:
                if isinstance(layer, tuple):
                    _, bn, _c, _y, name = layer
                    tensors[f"{name}/train/gamma"] = inits[f"{bn}.weight"].reshape(1, -1, 1, 1)
                    tensors[f"{name}/train/beta"] = inits[f"{bn}.bias"].reshape(1, -1, 1, 1)
        graph = helper.make_graph(
            nodes,
            "resnet18_shaped",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, HW, HW])],
            outs,
            [numpy_helper.from_array(v, k) for k, v in tensors.items()],
        )
        m = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="amq-bench"
        )
        m.ir_version = 8
        return m

    if stat_samples is not None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        m = make(train=True)
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, sess.run(None, {"input": stat_samples}), strict=True))
        for layer in layers:
            if isinstance(layer, tuple):
                _, bn, _c, _y, name = layer
                mean = res[f"{name}/train/mean"].ravel().astype(np.float64)
                var = res[f"{name}/train/var"].ravel().astype(np.float64) + 1e-6
                n = mean.shape[0]
                inits[f"{bn}.running_mean"] = (
                    mean + 0.1 * np.sqrt(var) * rng.standard_normal(n)
                ).astype(np.float32)
                inits[f"{bn}.running_var"] = (var * np.exp(rng.normal(0.0, 0.2, n))).astype(
                    np.float32
                )
        # centre and scale the classifier on the eval-mode features
        m = make(extra_outputs=("/Flatten_output_0",))
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        logits, feats = sess.run(None, {"input": stat_samples})
        w = inits["fc.weight"].astype(np.float64)
        z = (feats - feats.mean(0)) @ w.T
        scale = 3.0 / max(float(z.std()), 1e-6)  # logits spread of a few units, like a trained net
        inits["fc.weight"] = (w * scale).astype(np.float32)
        inits["fc.bias"] = (-(feats.mean(0) @ w.T) * scale + rng.normal(0.0, 0.1, 1000)).astype(
            np.float32
        )
    model = make()
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _interp_matrix(hw: int, r: int) -> np.ndarray:
    """(hw, r) linear interpolation from an r-point grid to an hw-point grid."""
    xs = np.linspace(0.0, r - 1.0, hw)
    eye = np.eye(r)
    return np.stack([np.interp(xs, np.arange(r), eye[j]) for j in range(r)], axis=1).astype(
        np.float32
    )


def smooth_images(out: np.ndarray, seed: int) -> None:
    """Fill ``out`` [n,3,HW,HW] with smoothed-noise 'images': octaves of bilinearly upsampled noise,
    correlated across channels, per-image brightness and contrast, a little pixel noise; roughly
    ImageNet-normalised (mean ~0, std ~1)."""
    rng = np.random.default_rng(seed)
    n, _c, hw, _ = out.shape
    octaves = [(4, 1.0), (8, 0.7), (16, 0.5), (32, 0.35), (64, 0.25)]
    mats = {r: _interp_matrix(hw, r) for r, _ in octaves}
    mix = np.array([[1.0, 0.3, 0.2], [0.3, 1.0, 0.3], [0.2, 0.3, 1.0]], np.float32)
    for i in range(0, n, 32):
        b = min(32, n - i)
        img = np.zeros((b, 3, hw, hw), np.float32)
        for r, amp in octaves:
            z = rng.standard_normal((b, 3, r, r)).astype(np.float32) * amp
            img += mats[r] @ z @ mats[r].T
        img = np.einsum("ij,bjhw->bihw", mix, img)
        img += 0.05 * rng.standard_normal(img.shape).astype(np.float32)
        m = img.mean(axis=(1, 2, 3), keepdims=True)
        s = img.std(axis=(1, 2, 3), keepdims=True) + 1e-6
        contrast = rng.uniform(0.6, 1.4, (b, 1, 1, 1)).astype(np.float32)
        bright = rng.normal(0.0, 0.3, (b, 1, 1, 1)).astype(np.float32)
        out[i : i + b] = (img - m) / s * contrast + bright


def write_images(path: Path, n: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 3, HW, HW))
    smooth_images(arr, seed)
    arr.flush()
    del arr


# ---------------------------------------------------------------------------------------------
# Children: one configuration each


class _MemSampler:
    """Peaks of VmRSS / RssAnon / RssFile from /proc/self/status, sampled every few ms (VmHWM is
    the kernel's own peak of this process image)."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        out = {}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                        out[k] = int(v.split()[0])
        except OSError:
            pass
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, v in self.read().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            time.sleep(self.period)

    def __enter__(self) -> _MemSampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        for k, v in self.read().items():
            self.peak[k] = max(self.peak.get(k, 0), v)


def _batches(arr: np.ndarray, n: int, bs: int = BATCH):
    for i in range(0, n, bs):
        yield np.ascontiguousarray(arr[i : min(i + bs, n)], dtype=np.float32)


def _warm_process() -> None:
    """What every child pays once before its timer: onnx's operator-schema registry (about 11 ms,
    loaded by the first shape inference or check; importing onnxruntime.quantization loads it) and
    onnxruntime's environment (one session on a one-node model). Without this, the first tool to
    touch either in a process pays for it: amq.quantize did, ORT's quantize_static (timed after
    quant_pre_process in the same process) did not."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    onnx.defs.get_schema("Conv")
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "warm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": np.zeros(1, np.float32)})


def child_float(spec: dict) -> dict:
    import onnxruntime as ort

    _warm_process()

    arr = np.load(spec["data"], mmap_mode="r")
    n = spec["n"]
    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(spec["model"], so, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    for b in _batches(arr, n):
        sess.run(None, {spec["input"]: b})
    t2 = time.perf_counter()
    return {"session_s": t1 - t0, "run_s": t2 - t1, "total_s": t2 - t0}


def child_amq(spec: dict) -> dict:
    import onnxruntime as ort

    import amq
    import amq.api as api
    import amq.calib.runner as runner
    from amq.config import Config, with_overrides

    _warm_process()
    timings: dict[str, float] = {}
    phase_mem: dict[str, dict[str, float]] = {}  # VmHWM / VmRSS (MB) when each phase ended
    trace: list[tuple[float, float]] = []  # (RssAnon, RssFile) MB after each calibration batch
    observed = {"bytes": 0, "tensors": 0}

    def timed(mod, name: str, key: str):
        fn = getattr(mod, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
                m = _MemSampler.read()
                phase_mem[key] = {"hwm": m.get("VmHWM", 0) / 1024, "rss": m.get("VmRSS", 0) / 1024}

        setattr(mod, name, wrapper)

    # small wrappers (no edit of amq): the phases of quantize and, inside collect_stats, the time
    # spent in onnxruntime and in the observers
    for mod, name, key in (
        (api, "prepare", "prepare"),
        (api, "open_data", "open_data"),
        (api, "build_plan", "build_plan"),
        (runner, "probe", "probe"),
        (runner, "collect_stats", "collect_stats"),
        (api, "emit_qdq", "emit_qdq"),
        (api, "fidelity", "summary_fidelity"),
        (api, "save_model", "save"),
    ):
        timed(mod, name, key)
    in_calib = {"on": False}
    orig_collect = runner.collect_stats

    def collect(*a, **k):
        in_calib["on"] = True
        observed["tensors"] = len(a[1])
        user_cb = k.get("on_batch")

        def on_batch(n):
            m = _MemSampler.read()
            trace.append((m.get("RssAnon", 0) / 1024, m.get("RssFile", 0) / 1024))
            if user_cb:
                user_cb(n)

        k["on_batch"] = on_batch
        try:
            return orig_collect(*a, **k)
        finally:
            in_calib["on"] = False

    runner.collect_stats = collect
    orig_run = ort.InferenceSession.run
    orig_update = runner.HistogramObserver.update

    def run(self, *a, **k):
        if not in_calib["on"]:
            return orig_run(self, *a, **k)
        t = time.perf_counter()
        try:
            return orig_run(self, *a, **k)
        finally:
            timings["calib_ort_run"] = timings.get("calib_ort_run", 0.0) + time.perf_counter() - t

    def timed_method(orig):
        def wrapped(self, x, *args, **kwargs):
            observed["bytes"] += getattr(x, "nbytes", 0)
            t, c = time.perf_counter(), time.thread_time()
            try:
                return orig(self, x, *args, **kwargs)
            finally:
                timings["calib_observers"] = (
                    timings.get("calib_observers", 0.0) + time.perf_counter() - t
                )
                timings["calib_observers_cpu"] = (
                    timings.get("calib_observers_cpu", 0.0) + time.thread_time() - c
                )

        return wrapped

    ort.InferenceSession.run = run
    runner.HistogramObserver.update = timed_method(orig_update)
    if hasattr(runner.HistogramObserver, "update_sample"):  # the runtime-reduced path
        runner.HistogramObserver.update_sample = timed_method(
            runner.HistogramObserver.update_sample
        )

    calib: dict = {"method": spec["method"], "num_samples": spec["n"], "batch_size": BATCH}
    if spec["method"] == "percentile":
        calib["percentile"] = spec.get("percentile", 99.99)
    cfg = with_overrides(Config(), calibration=calib)
    prof = None
    if spec.get("profile"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    res = amq.quantize(spec["model"], spec["calib"], config=cfg, output=spec["out"], cache_dir=None)
    total = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
        prof.dump_stats(spec["profile"])
    out = {"total_s": total, **{k + "_s": v for k, v in timings.items()}}
    out["calibration_samples"] = res.summary.calibration_samples
    out["layers_quantized"] = res.summary.layers_quantized
    out["phase_mem"] = phase_mem
    out["calib_trace"] = trace
    out["observed_gb"] = observed["bytes"] / 1e9
    out["observed_tensors"] = observed["tensors"]
    return out


def child_ort(spec: dict) -> dict:
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.ERROR)
    arr = np.load(spec["data"], mmap_mode="r")
    n = spec["n"]
    name = spec["input"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = _batches(arr, n)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {name: b}

    pre = spec["out"] + ".pre.onnx"
    _warm_process()
    t0 = time.perf_counter()
    quant_pre_process(spec["model"], pre)
    t1 = time.perf_counter()
    extra: dict = {}
    method = CalibrationMethod.MinMax
    if spec["method"] == "percentile":
        method = CalibrationMethod.Percentile
        extra = {"CalibPercentile": spec["ort_percentile"], "CalibTensorRangeSymmetric": False}
    quantize_static(
        pre,
        spec["out"],
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
        extra_options=extra,
    )
    t2 = time.perf_counter()
    os.remove(pre)
    return {"pre_process_s": t1 - t0, "quantize_static_s": t2 - t1, "total_s": t2 - t0}


def child_eval(spec: dict) -> dict:
    """Float and quantized models on the same held-out inputs: top-1 (with labels), output SQNR
    over all outputs, per-sample cosine (mean and min), top-1 agreement with float."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    x = np.load(spec["data"], mmap_mode="r")
    n = spec["n"]
    labels = np.load(spec["labels"])[:n] if spec.get("labels") else None

    def outputs(path: str) -> np.ndarray:
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {spec["input"]: b})[0] for b in _batches(x, n, 32)])

    ref = outputs(spec["float"]).astype(np.float64)
    res = {}
    for key, path in [("float", spec["float"])] + list(spec["quant"].items()):
        q = ref if key == "float" else outputs(path).astype(np.float64)
        r = {}
        if labels is not None:
            r["top1"] = float(np.mean(q.argmax(1) == labels))
        if key != "float":
            err = ref - q
            r["sqnr_db"] = float(10 * np.log10(np.sum(ref**2) / max(np.sum(err**2), 1e-30)))
            cos = np.sum(ref * q, 1) / (
                np.linalg.norm(ref, axis=1) * np.linalg.norm(q, axis=1) + 1e-30
            )
            r["cosine_mean"] = float(cos.mean())
            r["cosine_min"] = float(cos.min())
            r["agreement"] = float(np.mean(q.argmax(1) == ref.argmax(1)))
        res[key] = r
    return res


def _observed(spec: dict, n: int):
    """amq's preparation of spec["model"] with n samples of spec["data"]'s folder (minmax,
    batches of BATCH): (prepared model, the tensors calibration observes, and a function running
    amq's calibration pass on them with a given histogram budget per sample, None: amq's)."""
    import amq.api as api
    import amq.calib.runner as runner
    from amq.calib.data import batches, open_data
    from amq.config import Config, with_overrides

    cfg = with_overrides(
        Config(), calibration={"method": "minmax", "num_samples": n, "batch_size": BATCH}
    )
    prep = api.prepare(spec["model"], cfg)
    data = open_data(str(Path(spec["data"]).parent), prep.specs, cfg).subset(n, 0)
    ws = api.Workspace(prep, cfg, data, None, False)
    tensors = sorted(ws.sources(ws.structure(cfg)))

    def collect(per_sample: int | None) -> dict:
        return runner.collect_stats(
            prep.model,
            tensors,
            batches(data, prep.specs, BATCH),
            2048,
            samples=n,
            info=ws.info,
            per_sample=per_sample,
        )

    return prep, tensors, collect


def child_observers(spec: dict) -> dict:
    """amq's calibration pass (runner.collect_stats) on the tensors it observes, twice on the same
    samples: as it is (onnxruntime reduces each tensor to its extremes and a subsample) and with a
    histogram of every value (a per-sample budget too big to subsample, so every tensor is copied
    out whole and binned by numpy). Reports wall time, observer CPU time and how far amq's
    subsampled histogram moves a percentile-99.99 range against the full one."""
    import amq.quant.observers as obs

    _warm_process()
    n = spec["n"]
    _prep, tensors, collect = _observed(spec, n)
    cpu = {"t": 0.0}

    def timed(orig):
        def wrapped(self, *a, **k):
            c = time.thread_time()
            try:
                return orig(self, *a, **k)
            finally:
                cpu["t"] += time.thread_time() - c

        return wrapped

    obs.HistogramObserver.update = timed(obs.HistogramObserver.update)
    obs.HistogramObserver.update_sample = timed(obs.HistogramObserver.update_sample)
    out: dict = {"tensors": len(tensors), "samples": n}
    stats = {}
    for variant, per_sample in (("amq", None), ("full", 1 << 40)):
        cpu["t"] = 0.0
        t0 = time.perf_counter()
        stats[variant] = collect(per_sample)
        out[f"{variant}_s"] = time.perf_counter() - t0
        out[f"{variant}_observer_cpu_s"] = cpu["t"]
        out[f"{variant}_binned"] = int(sum(st.counts.sum() for st in stats[variant].values()))
    worst = (0.0, "")
    for t in tensors:
        a, b = stats["amq"][t], stats["full"][t]
        assert (a.min, a.max) == (b.min, b.max), t  # the extremes are exact either way
        lo, hi = obs.range_percentile(b, 99.99)
        lo2, hi2 = obs.range_percentile(a, 99.99)
        span = max(b.max, 0.0) - min(b.min, 0.0)
        worst = max(worst, (max(abs(lo - lo2), abs(hi - hi2)) / max(span, 1e-12), t))
    out["p9999_dev"] = worst
    return out


def child_floor(spec: dict) -> dict:
    """What calibrating the bundled model can cost at the least, in one process, repetitions
    interleaved (medians): the float pass (session creation + runs, as in section 1); the same
    session with the tensors amq observes exposed as outputs and nothing done with them; that plus
    numpy's min and max of each (all a bare minmax calibrator does); amq's calibration pass with
    histograms cut to 64 values per sample; amq's calibration pass as shipped."""
    import onnx
    import onnxruntime as ort

    _warm_process()
    n, reps = spec["n"], spec["reps"]
    prep, tensors, collect = _observed(spec, n)
    inputs = {i.name for i in prep.model.graph.input}
    exposed = [t for t in tensors if t not in inputs]
    arr = np.load(spec["data"], mmap_mode="r")
    plain = onnx.load(spec["model"]).SerializeToString()
    wide = onnx.load(spec["model"])
    wide.graph.output.extend(onnx.ValueInfoProto(name=t) for t in exposed)
    wide_bytes = wide.SerializeToString()

    def ort_pass(model: bytes, names, reduce: bool) -> None:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        for b in _batches(arr, n):
            outs = sess.run(names, {spec["input"]: b})
            if reduce:
                for o in outs:
                    float(o.min()), float(o.max())

    variants = {
        "float": lambda: ort_pass(plain, None, False),
        "expose": lambda: ort_pass(wide_bytes, exposed, False),
        "expose_minmax": lambda: ort_pass(wide_bytes, exposed, True),
        "amq_hist64": lambda: collect(64),
        "amq": lambda: collect(None),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps + 2):  # the first two rounds warm caches and are dropped
        for k, f in variants.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    times = {k: v[2:] for k, v in times.items()}
    ratios = {k: [a / b for a, b in zip(v, times["float"], strict=True)] for k, v in times.items()}
    return {
        "tensors": len(tensors),
        "exposed": len(exposed),
        "samples": n,
        "reps": reps,
        "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ratio": {k: statistics.median(v) for k, v in ratios.items()},
        "ratio_range": {k: (min(v), max(v)) for k, v in ratios.items()},
    }


def child_setup(spec: dict) -> dict:
    """Build the ResNet-18-shaped model and write the data (in a child, so that the parent stays
    small: on Linux a child's ru_maxrss also counts the memory of the parent it was forked from)."""
    t = time.perf_counter()
    work = Path(spec["work"])
    dcal = work / "digits_calib" / "input.npy"
    dcal.parent.mkdir()
    np.save(dcal, np.load(ROOT / "calib_data" / "input.npy")[: spec["n_digits"]])
    stats_x = np.empty((16, 3, HW, HW), np.float32)
    smooth_images(stats_x, seed=99)
    build_resnet18(work / "resnet18.onnx", seed=0, stat_samples=stats_x)
    write_images(work / "resnet_calib" / "input.npy", spec["n_res"], seed=1)
    write_images(work / "resnet_eval" / "input.npy", spec["n_res_eval"], seed=2)
    write_images(work / "resnet_calib_big" / "input.npy", spec["rss_big"], seed=3)
    return {"setup_s": time.perf_counter() - t}


def child_info(spec: dict) -> dict:
    import onnx
    import onnxruntime

    import amq

    return {
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "amq": amq.__version__,
        "amq_file": amq.__file__,
    }


def child_idle(spec: dict) -> dict:
    """Baseline RSS: the imports both tools need, nothing else."""
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxruntime.quantization  # noqa: F401

    import amq  # noqa: F401

    return {}


CHILDREN = {
    "float": child_float,
    "amq": child_amq,
    "ort": child_ort,
    "eval": child_eval,
    "idle": child_idle,
    "setup": child_setup,
    "observers": child_observers,
    "floor": child_floor,
    "info": child_info,
}


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    sys.path.insert(0, str(ROOT))
    if spec.get("amq_src"):  # a snapshot of amq/ at a given revision (--amq-rev)
        sys.path.insert(0, spec["amq_src"])
    with _MemSampler() as mem:
        before = _MemSampler.read()
        result = CHILDREN[spec["task"]](spec)
    result["rss_start_kb"] = before.get("VmRSS", 0)
    result["peak_anon_kb"] = mem.peak["RssAnon"]
    result["peak_file_kb"] = mem.peak["RssFile"]
    result["vmhwm_mb"] = mem.peak.get("VmHWM", 0) / 1024.0
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Parent


def run_child(spec: dict, workdir: Path, log: list[str]) -> dict:
    """Run one configuration in a fresh interpreter; peak RSS from os.wait4 of that child."""
    fd, result = tempfile.mkstemp(dir=workdir, suffix=".json")
    os.close(fd)
    spec = {**spec, "result": result, "amq_src": spec.get("amq_src", AMQ_SRC.get("path"))}
    errf = workdir / "child.log"
    with open(errf, "w") as err:
        p = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            cwd=ROOT,
            stdout=err,
            stderr=subprocess.STDOUT,
        )
        _pid, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(
            f"child {spec['task']} failed ({p.returncode}):\n{errf.read_text()[-4000:]}"
        )
    out = json.loads(Path(result).read_text())
    out["maxrss_mb"] = ru.ru_maxrss / 1024.0  # Linux: KiB
    out["cpu_s"] = ru.ru_utime + ru.ru_stime  # the whole child, imports included
    label = spec.get("label", spec["task"])
    msg = f"  {label}: " + ", ".join(
        f"{k}={v:.3f}" for k, v in out.items() if isinstance(v, float) and k.endswith(("_s", "_mb"))
    )
    print(msg, flush=True)
    log.append(msg)
    return out


def machine_info(versions: dict) -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "amq"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        commit += " (amq/ has uncommitted changes)" if dirty else ""
    except OSError:
        commit = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": versions["onnxruntime"],
        "onnx": versions["onnx"],
        "numpy": versions["numpy"],
        "amq": f"{versions['amq']} @ {commit}",
        "amq_file": versions["amq_file"],
    }


def mem_available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pyspy_summary(spec: dict, workdir: Path, top: int = 20) -> list[str]:
    """Run one amq child under ``py-spy record --native`` (if py-spy is installed) and summarise
    the samples of the main thread inside amq.quantize: inclusive shares of the main phases and
    the hottest native leaf functions (numpy loops, onnxruntime, the kernel)."""
    import collections
    import re

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return ["(py-spy not installed: `pip install py-spy` for the native profile)"]
    raw = workdir / "pyspy.txt"
    fd, result = tempfile.mkstemp(dir=workdir, suffix=".json")
    os.close(fd)
    spec = {**spec, "result": result, "amq_src": AMQ_SRC.get("path")}
    cmd = [exe, "record", "--native", "-r", "200", "-f", "raw", "-o", str(raw), "--"]
    cmd += [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0 or not raw.exists():
        return [f"(py-spy failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]})"]
    total = 0
    incl: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    cs = "collect_stats (amq/calib/runner.py"
    fid = "fidelity (amq/api.py"
    run = "run (onnxruntime/capi/onnxruntime_inference_collection.py"
    keys = {  # label: every string that must be in the stack
        "amq.quantize": ("quantize (amq/api.py",),
        "- prepare (load, name nodes, fold BN, infer types)": ("prepare (amq/api.py",),
        "- runner.probe (one call exposing every tensor)": ("probe (amq/calib/runner.py",),
        "- runner.collect_stats (the calibration pass)": (cs,),
        "-- session creation (runner.session)": (cs, "session (amq/calib/runner.py"),
        "-- InferenceSession.run": (cs, run),
        "-- HistogramObserver.update": (cs, "update (amq/quant/observers.py"),
        "--- of which _bin_counts": (cs, "_bin_counts (amq/quant/observers.py"),
        "--- of which _grow / _regrid": (cs, "_grow (amq/quant/observers.py"),
        "-- data: batches / check_sample": (cs, "batches (amq/calib/data.py"),
        "- emit_qdq": ("emit_qdq (amq/quant/qdq.py",),
        "- summary fidelity (float + quantized sessions)": (fid,),
        "-- of which InferenceSession.run": (fid, run),
    }
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "quantize (amq/api.py" not in stack:
            continue  # other threads (the memory sampler) and the child's own set-up
        total += int(n)
        for label, needles in keys.items():
            if all(x in stack for x in needles):
                incl[label] += int(n)
        f = stack.split(";")[-1]
        name, _, where = f.partition(" (")
        if re.fullmatch(r"0x[0-9a-f]+", name):
            name = "[native, no symbol] " + Path(where.split(":")[0].rstrip(")")).name
        leaf[name] += int(n)
    if not total:
        return ["(py-spy: no samples inside amq.quantize)"]
    lines = [
        f"py-spy `record --native` at 200 Hz of the main thread inside `amq.quantize` ({total} samples; onnxruntime's own worker threads are not Python threads and are not sampled, so time in `InferenceSession.run` is wall time of the main thread waiting on them):",
        "",
        "| phase (inclusive) | % of samples |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {100 * incl[k] / total:.1f} |" for k in keys]
    lines += ["", "Hottest leaf functions (self time):", "", "| % | function |", "| ---: | --- |"]
    lines += [f"| {100 * v / total:.1f} | `{k}` |" for k, v in leaf.most_common(top)]
    return lines


def profile_summary(path: Path, total: float, top: int = 25) -> list[str]:
    """Own (tottime) and cumulative time of the hottest functions, as % of quantize wall time."""
    import pstats

    st = pstats.Stats(str(path))
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():
        short = file
        for marker in ("site-packages/", str(ROOT) + "/", "amq_src/"):
            if marker in file:
                short = file.split(marker, 1)[1]
        rows.append((tt, ct, nc, f"{short}:{line}({func})" if line else func))
    lines = [
        "| own s | own % | cumulative s | cum % | calls | function |",
        "| ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for tt, ct, nc, name in sorted(rows, reverse=True)[:top]:
        lines.append(
            f"| {tt:.2f} | {100 * tt / total:.1f} | {ct:.2f} | {100 * ct / total:.1f} | {nc} | `{name}` |"
        )
    amq_rows = sorted((r for r in rows if "amq/" in r[3]), key=lambda r: -r[1])[:15]
    lines += [
        "",
        "amq functions by cumulative time:",
        "",
        "| cumulative s | cum % | own s | calls | function |",
        "| ---: | ---: | ---: | ---: | --- |",
    ]
    for tt, ct, nc, name in amq_rows:
        lines.append(f"| {ct:.2f} | {100 * ct / total:.1f} | {tt:.2f} | {nc} | `{name}` |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few samples, one repetition (smoke test)")
    ap.add_argument("--out", help="report file (default: bench/RESULTS.md; --quick: print only)")
    ap.add_argument("--reps", type=int, help="repetitions of each timed configuration")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    ap.add_argument(
        "--amq-rev",
        help="benchmark amq/ as committed at this git revision (e.g. HEAD) instead of the work tree",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return

    quick = args.quick
    reps = args.reps or (1 if quick else 5)
    n_digits = 64 if quick else 256
    n_res = 32 if quick else 256
    n_res_eval = 16 if quick else 64
    rss_small, rss_big = (16, 64) if quick else (64, 1024)
    out_path = Path(args.out) if args.out else (None if quick else ROOT / "bench" / "RESULTS.md")
    command = "python bench/bench_quantize.py" + "".join(f" {a}" for a in sys.argv[1:])
    started = dt.datetime.now()
    work = Path(tempfile.mkdtemp(prefix="amq-bench-"))
    try:
        log: list[str] = []
        amq_src = None
        if args.amq_rev:
            amq_src = work / "amq_src"
            amq_src.mkdir()
            rev = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", args.amq_rev],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            tar = subprocess.run(
                ["git", "-C", str(ROOT), "archive", rev, "amq"], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(amq_src)], input=tar, check=True)
        info = machine_info(
            run_child({"task": "info", "amq_src": amq_src and str(amq_src)}, work, log)
        )
        AMQ_SRC["path"] = amq_src and str(amq_src)
        print(f"amq from {info['amq_file']}", flush=True)
        if args.amq_rev:
            info["amq"] = f"{info['amq'].split(' @ ')[0]} @ {rev} (committed tree, via --amq-rev)"
        print(
            f"amq benchmark ({'quick' if quick else 'full'}), {info['cpu']}, {info['cores']} cores",
            flush=True,
        )
        # ---- data and models (in a child: the parent stays small, see child_setup)
        setup = run_child(
            {
                "task": "setup",
                "work": str(work),
                "n_digits": n_digits,
                "n_res": n_res,
                "n_res_eval": n_res_eval,
                "rss_big": rss_big,
            },
            work,
            log,
        )
        print(f"setup (model + data) {setup['setup_s']:.1f}s in {work}", flush=True)
        digits = ROOT / "examples" / "digits_cnn.onnx"
        dcal = work / "digits_calib" / "input.npy"
        resnet = work / "resnet18.onnx"
        rcal = work / "resnet_calib" / "input.npy"
        reval = work / "resnet_eval" / "input.npy"
        rbig = work / "resnet_calib_big" / "input.npy"

        models = {
            "digits": {"model": str(digits), "calib": str(dcal), "n": n_digits, "input": "input"},
            "resnet18": {"model": str(resnet), "calib": str(rcal), "n": n_res, "input": "input"},
        }
        idle = run_child({"task": "idle", "label": "idle (imports only)"}, work, log)

        # ---- 1+2: time, RSS, accuracy (minmax), repetitions interleaved
        timing: dict[str, dict[str, list[dict]]] = {
            m: {"float": [], "amq": [], "ort": []} for m in models
        }
        for rep in range(reps):
            for mname, m in models.items():
                print(f"rep {rep + 1}/{reps} {mname}", flush=True)
                timing[mname]["float"].append(
                    run_child(
                        {
                            "task": "float",
                            "label": f"{mname} float",
                            "model": m["model"],
                            "data": m["calib"],
                            "n": m["n"],
                            "input": m["input"],
                        },
                        work,
                        log,
                    )
                )
                timing[mname]["amq"].append(
                    run_child(
                        {
                            "task": "amq",
                            "label": f"{mname} amq",
                            "model": m["model"],
                            "calib": str(Path(m["calib"]).parent),
                            "n": m["n"],
                            "method": "minmax",
                            "out": str(work / f"{mname}.amq.onnx"),
                        },
                        work,
                        log,
                    )
                )
                timing[mname]["ort"].append(
                    run_child(
                        {
                            "task": "ort",
                            "label": f"{mname} ort",
                            "model": m["model"],
                            "data": m["calib"],
                            "n": m["n"],
                            "input": m["input"],
                            "method": "minmax",
                            "out": str(work / f"{mname}.ort.onnx"),
                        },
                        work,
                        log,
                    )
                )

        # ---- percentile 99.99 (amq) vs 99.98 two-sided (ORT): the same tail mass per side
        perc: dict[str, dict] = {}
        for mname, m in models.items():
            need_gb = 0.03 * m["n"] if mname == "resnet18" else 0.5  # ORT keeps every activation
            if mem_available_gb() < 2 * need_gb + 2:
                perc[mname] = {
                    "skipped": f"needs ~{need_gb:.0f} GB free for ORT's histogram calibrator"
                }
                continue
            print(f"percentile {mname}", flush=True)
            perc[mname] = {
                "amq": run_child(
                    {
                        "task": "amq",
                        "label": f"{mname} amq percentile",
                        "model": m["model"],
                        "calib": str(Path(m["calib"]).parent),
                        "n": m["n"],
                        "method": "percentile",
                        "percentile": 99.99,
                        "out": str(work / f"{mname}.amq_p.onnx"),
                    },
                    work,
                    log,
                ),
                "ort": run_child(
                    {
                        "task": "ort",
                        "label": f"{mname} ort percentile",
                        "model": m["model"],
                        "data": m["calib"],
                        "n": m["n"],
                        "input": m["input"],
                        "method": "percentile",
                        "ort_percentile": 99.98,
                        "out": str(work / f"{mname}.ort_p.onnx"),
                    },
                    work,
                    log,
                ),
            }

        # ---- accuracy
        print("accuracy", flush=True)
        acc = {}
        for mname, data, labels, n in (
            ("digits", ROOT / "eval_data" / "input.npy", ROOT / "eval_data" / "labels.npy", 540),
            ("resnet18", reval, None, n_res_eval),
        ):
            quant = {"amq": str(work / f"{mname}.amq.onnx"), "ort": str(work / f"{mname}.ort.onnx")}
            if "amq" in perc[mname]:
                quant.update(
                    {
                        "amq_p": str(work / f"{mname}.amq_p.onnx"),
                        "ort_p": str(work / f"{mname}.ort_p.onnx"),
                    }
                )
            acc[mname] = run_child(
                {
                    "task": "eval",
                    "label": f"{mname} eval",
                    "float": models[mname]["model"],
                    "quant": quant,
                    "data": str(data),
                    "labels": str(labels) if labels else None,
                    "n": n,
                    "input": "input",
                },
                work,
                log,
            )

        # ---- 3: RSS vs number of calibration samples (one memory-mapped .npy)
        print("RSS vs calibration samples", flush=True)
        rss = {}
        for n in (rss_small, rss_big):
            rss[n] = run_child(
                {
                    "task": "amq",
                    "label": f"resnet18 amq N={n}",
                    "model": str(resnet),
                    "calib": str(rbig.parent),
                    "n": n,
                    "method": "minmax",
                    "out": str(work / f"rss{n}.onnx"),
                },
                work,
                log,
            )

        # ---- 4: profile
        prof_lines: list[str] = []
        if not args.no_profile:
            print("profile", flush=True)
            pfile = work / "amq.prof"
            pr = run_child(
                {
                    "task": "amq",
                    "label": "resnet18 amq (cProfile)",
                    "model": str(resnet),
                    "calib": str(rcal.parent),
                    "n": n_res,
                    "method": "minmax",
                    "out": str(work / "prof.onnx"),
                    "profile": str(pfile),
                },
                work,
                log,
            )
            prof_lines = [
                f"cProfile of `amq.quantize` on resnet18, {n_res} samples, minmax; wall time under the profiler {pr['total_s']:.2f} s.",
                "",
            ]
            prof_lines += profile_summary(pfile, pr["total_s"])
            if not quick:  # a second profiled run: kept out of the smoke test
                prof_lines += [""] + pyspy_summary(
                    {
                        "task": "amq",
                        "model": str(resnet),
                        "calib": str(rcal.parent),
                        "n": n_res,
                        "method": "minmax",
                        "out": str(work / "spy.onnx"),
                    },
                    work,
                )
        print("observer micro-benchmark", flush=True)
        obs_micro = run_child(
            {
                "task": "observers",
                "label": "observers",
                "model": str(resnet),
                "data": str(rcal),
                "n": min(n_res, 64),
            },
            work,
            log,
        )
        print("calibration floor on digits", flush=True)
        floor = run_child(
            {
                "task": "floor",
                "label": "digits floor",
                "model": str(digits),
                "data": str(dcal),
                "input": "input",
                "n": n_digits,
                "reps": 3 if quick else 21,
            },
            work,
            log,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = render(
        info,
        command,
        started,
        quick,
        reps,
        models,
        n_res_eval,
        idle,
        timing,
        perc,
        acc,
        rss,
        rss_small,
        rss_big,
        prof_lines,
        obs_micro,
        floor,
        log,
    )
    if out_path is None:
        print(report)
    else:
        write_keeping_notes(out_path, report)
        print(f"wrote {out_path}")


def render(
    info,
    command,
    started,
    quick,
    reps,
    models,
    n_eval,
    idle,
    timing,
    perc,
    acc,
    rss,
    rss_small,
    rss_big,
    prof_lines,
    obs_micro,
    floor,
    log,
) -> str:
    L: list[str] = []
    a = L.append
    a(
        "# amq benchmark results"
        + (" (QUICK smoke run: few samples, not representative)" if quick else "")
    )
    a("")
    a(f"- date: {started:%Y-%m-%d %H:%M}")
    a(f"- command: `{command}` (from the repository root)")
    a(
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, {info['os']} (shared and noisy: compare ratios)"
    )
    a(
        f"- versions: python {info['python']}, onnxruntime {info['onnxruntime']}, onnx {info['onnx']}, numpy {info['numpy']}, amq {info['amq']}"
    )
    a(
        "- every child first initialises onnx's operator-schema registry and onnxruntime (one session on a one-node model) outside its timer, so no tool is charged the ~15 ms that the first of them pays in a fresh process (quantize_static is timed after quant_pre_process in the same process anyway)\n"
        f"- each configuration ran in a fresh subprocess; times are medians of {reps} interleaved repetition(s); peak RSS is the child's `ru_maxrss` (from `os.wait4`); a child that only imports onnx, onnxruntime, onnxruntime.quantization and amq peaks at {idle['maxrss_mb']:.0f} MB"
    )
    a(
        "- amq: `amq.quantize(model, calib_folder, config, output, cache_dir=None)` with `calibration={method: minmax, num_samples: N, batch_size: 16}`; its wall time includes the 64-sample float-vs-quantized summary it always computes (shown separately)"
    )
    a(
        "- onnxruntime: `quant_pre_process` (the documented preparation: shape inference, BN folding) then `quantize_static(QuantFormat.QDQ, per_channel=True, activation QUInt8, weight QInt8, CalibrationMethod.MinMax)` fed the same samples by a `CalibrationDataReader` in batches of 16"
    )
    a(
        "- float inference: one `InferenceSession` (default options, session creation included) over the same samples, batch 16 - the reference cost of one calibration pass"
    )
    a("")
    a("## Models")
    a("")
    a(
        f"- **digits**: `examples/digits_cnn.onnx` (bundled, ~10k params), calibration: first {models['digits']['n']} samples of `calib_data/input.npy`, evaluation: `eval_data/` (540 samples, labels)"
    )
    a(
        f"- **resnet18**: ResNet-18-shaped CNN built by the script with onnx.helper (seeded He-init, 20 unfused BatchNormalization with measured-then-perturbed running stats, 4 stages x 2 basic blocks, widths 64/128/256/512, input `input` [N,3,224,224], 1000 logits); {models['resnet18']['n']} seeded smoothed-noise calibration images in one .npy, {n_eval} held-out images from another seed for evaluation"
    )
    a("")

    a("## 1-2. Speed and memory (minmax)")
    a("")
    a(
        "| model | N | float inference s | amq quantize s | amq calibration s | calibration / float | ORT pre_process + quantize_static s | quantize_static s | ORT total / amq | quantize_static / amq | amq peak RSS MB | ORT peak RSS MB |"
    )
    a("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios = {}
    for mname, m in models.items():
        tf = timing[mname]["float"]
        ta = timing[mname]["amq"]
        to = timing[mname]["ort"]
        cal = [x["collect_stats_s"] / f["total_s"] for x, f in zip(ta, tf, strict=True)]
        tot = [o["total_s"] / x["total_s"] for o, x in zip(to, ta, strict=True)]
        sta = [o["quantize_static_s"] / x["total_s"] for o, x in zip(to, ta, strict=True)]
        cal_ratio, ort_ratio, static_ratio = med(cal), med(tot), med(sta)
        ratios[mname] = (cal_ratio, ort_ratio, static_ratio)

        def rng(xs: list[float]) -> str:
            return f" ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else ""

        a(
            f"| {mname} | {m['n']} | {med([f['total_s'] for f in tf]):.2f} | {med([x['total_s'] for x in ta]):.2f} | {med([x['collect_stats_s'] for x in ta]):.2f} | "
            f"**{cal_ratio:.2f}x**{rng(cal)} | {med([o['total_s'] for o in to]):.2f} | {med([o['quantize_static_s'] for o in to]):.2f} | **{ort_ratio:.2f}x**{rng(tot)} | {static_ratio:.2f}x{rng(sta)} | "
            f"{med([x['maxrss_mb'] for x in ta]):.0f} | {med([o['maxrss_mb'] for o in to]):.0f} |"
        )
    a("")
    a(
        "Ratios are medians of per-repetition ratios (each repetition ran float, amq and ORT back to back), with the smallest and largest repetition in brackets. A ratio `X / amq` > 1 means amq is faster than X."
    )
    a("")
    a(
        "Where amq's time goes (medians, seconds; calibration = `runner.collect_stats`, split into onnxruntime `run` calls, observer `update`s and the rest: session creation, data loading/checks, batching):"
    )
    a("")
    a(
        "| model | prepare | open_data | probe | calibration | - ORT run | - observers | - other | build_plan total | emit_qdq | summary fidelity | save | float session | float run |"
    )
    a(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for mname in models:
        ta = timing[mname]["amq"]
        tf = timing[mname]["float"]

        def g(k, ta=ta):
            return med([x.get(k, 0.0) for x in ta])

        other = med(
            [
                x["collect_stats_s"] - x.get("calib_ort_run_s", 0) - x.get("calib_observers_s", 0)
                for x in ta
            ]
        )
        a(
            f"| {mname} | {g('prepare_s'):.2f} | {g('open_data_s'):.2f} | {g('probe_s'):.2f} | {g('collect_stats_s'):.2f} | {g('calib_ort_run_s'):.2f} | {g('calib_observers_s'):.2f} | {other:.2f} | "
            f"{g('build_plan_s'):.2f} | {g('emit_qdq_s'):.2f} | {g('summary_fidelity_s'):.2f} | {g('save_s'):.2f} | {med([f['session_s'] for f in tf]):.2f} | {med([f['run_s'] for f in tf]):.2f} |"
        )
    a("")
    a(
        "CPU time (user + sys of each child from `os.wait4`, imports included; less sensitive to other load on the machine than wall time, but onnxruntime's spinning worker threads add to it):"
    )
    a("")
    a(
        "| model | float s | amq s | ORT s | ORT / amq | observers, thread CPU s | observers GB seen | observers ns/byte |"
    )
    a("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mname in models:
        t = timing[mname]
        obs_cpu = med([x.get("calib_observers_cpu_s", 0.0) for x in t["amq"]])
        gb = med([x.get("observed_gb", 0.0) for x in t["amq"]])
        a(
            f"| {mname} | {med([x['cpu_s'] for x in t['float']]):.2f} | {med([x['cpu_s'] for x in t['amq']]):.2f} | {med([x['cpu_s'] for x in t['ort']]):.2f} | "
            f"{med([o['cpu_s'] / x['cpu_s'] for o, x in zip(t['ort'], t['amq'], strict=True)]):.2f}x | {obs_cpu:.2f} | {gb:.2f} | {obs_cpu / max(gb, 1e-9):.2f} |"
        )
    a("")
    a(
        "Peak memory split (medians, MB; sampled from /proc/self/status every 5 ms): anonymous / file-backed (mapped .npy and libraries)"
    )
    a("")
    a(
        "| model | amq VmHWM | amq anon | amq file | ORT VmHWM | ORT anon | ORT file | float VmHWM | float anon | float file |"
    )
    a("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mname in models:
        t = timing[mname]

        def pk(tool, k, t=t):
            return med([x[k] / (1 if k == "vmhwm_mb" else 1024) for x in t[tool]])

        a(
            f"| {mname} | "
            + " | ".join(
                f"{pk(tool, k):.0f}"
                for tool in ("amq", "ort", "float")
                for k in ("vmhwm_mb", "peak_anon_kb", "peak_file_kb")
            )
            + " |"
        )
    a("")

    a("## 1. Accuracy (same calibration samples, minmax for both)")
    a("")
    d = acc["digits"]
    a(
        f"digits, top-1 on the 540 eval samples: float **{100 * d['float']['top1']:.2f} %**, amq INT8 **{100 * d['amq']['top1']:.2f} %**, ORT INT8 **{100 * d['ort']['top1']:.2f} %**"
    )
    a("")
    a(
        "| model | tool | top-1 | output SQNR dB | cosine mean | cosine min | top-1 agreement with float |"
    )
    a("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for mname in acc:
        for key, label in (
            ("amq", "amq minmax"),
            ("ort", "ORT minmax"),
            ("amq_p", "amq percentile 99.99"),
            ("ort_p", "ORT percentile 99.98 (two-sided)"),
        ):
            if key not in acc[mname]:
                continue
            r = acc[mname][key]
            top1 = f"{100 * r['top1']:.2f} %" if "top1" in r else "-"
            a(
                f"| {mname} | {label} | {top1} | {r['sqnr_db']:.2f} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | {100 * r['agreement']:.1f} % |"
            )
    a("")
    a(
        f"resnet18 metrics are over the {n_eval} held-out images (logits vs the float model's logits; its classes mean nothing, so no top-1)."
    )
    a("")
    a(
        "Percentile: amq's `percentile: 99.99` clips 0.01 % of the values on each side; onnxruntime's `CalibPercentile` p with `CalibTensorRangeSymmetric=False` clips (100 - p) / 2 % per side, so ORT 99.98 is the same definition. Differences left: ORT's histogram spans [-max|x|, max|x|] in 2048 bins and picks a bin edge; amq's grid is zero-aligned with power-of-two bins and interpolates inside a bin."
    )
    a("")
    if perc:
        a("| model | amq percentile s | amq peak RSS MB | ORT percentile s | ORT peak RSS MB |")
        a("| --- | ---: | ---: | ---: | ---: |")
        for mname, p in perc.items():
            if "skipped" in p:
                a(f"| {mname} | skipped: {p['skipped']} | | | |")
            else:
                a(
                    f"| {mname} | {p['amq']['total_s']:.2f} | {p['amq']['maxrss_mb']:.0f} | {p['ort']['total_s']:.2f} | {p['ort']['maxrss_mb']:.0f} |"
                )
        a("")

    a(
        "## 3. amq peak RSS vs number of calibration samples (resnet18, minmax, one memory-mapped .npy)"
    )
    a("")
    a(
        "| N | wall s | calibration s | peak RSS MB (ru_maxrss) | VmHWM MB | peak anon MB | peak file-backed MB | anon after 1st / last calibration batch MB | file-backed after 1st / last batch MB |"
    )
    a("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, r in rss.items():
        tr = r["calib_trace"] or [(0.0, 0.0)]
        a(
            f"| {n} | {r['total_s']:.2f} | {r['collect_stats_s']:.2f} | {r['maxrss_mb']:.0f} | {r['vmhwm_mb']:.0f} | {r['peak_anon_kb'] / 1024:.0f} | {r['peak_file_kb'] / 1024:.0f} | "
            f"{tr[0][0]:.0f} / {tr[-1][0]:.0f} | {tr[0][1]:.0f} / {tr[-1][1]:.0f} |"
        )
    a("")
    a("Peak RSS (VmHWM, MB) reached by the end of each phase of `amq.quantize`:")
    a("")
    phases = [k for k in next(iter(rss.values()))["phase_mem"]]
    a("| N | " + " | ".join(phases) + " |")
    a("| ---: |" + " ---: |" * len(phases))
    for n, r in rss.items():
        a(f"| {n} | " + " | ".join(f"{r['phase_mem'][k]['hwm']:.0f}" for k in phases) + " |")
    big, small = rss[rss_big], rss[rss_small]
    rss_ratio = big["maxrss_mb"] / small["maxrss_mb"]
    anon_ratio = big["peak_anon_kb"] / max(small["peak_anon_kb"], 1)
    a("")
    a(
        f"RSS({rss_big}) / RSS({rss_small}) = **{rss_ratio:.3f}** (anonymous memory only: {anon_ratio:.3f})"
    )
    a("")

    a("## Targets")
    a("")
    cal = ratios["resnet18"][0]
    cal_d = ratios["digits"][0]
    a("| target | measured | met? |")
    a("| --- | --- | --- |")
    a(
        f"| calibration <= 1.3x float inference | resnet18 {cal:.2f}x, digits {cal_d:.2f}x | "
        f"resnet18 {'met' if cal <= 1.3 else 'NOT met'}, digits {'met' if cal_d <= 1.3 else 'NOT met'} |"
    )
    a(
        f"| RSS({rss_big}) within 10 % of RSS({rss_small}) | {100 * (rss_ratio - 1):+.1f} % (ru_maxrss) | {'met' if abs(rss_ratio - 1) <= 0.10 else 'NOT met'} |"
    )
    faster = all(ratios[m][2] > 1.0 for m in models)
    a(
        "| amq faster than quantize_static | quantize_static / amq: "
        + ", ".join(f"{m} {ratios[m][2]:.2f}x" for m in models)
        + " (with pre_process: "
        + ", ".join(f"{m} {ratios[m][1]:.2f}x" for m in models)
        + f") | {'met' if faster else 'NOT met'} |"
    )
    d_ok = acc["digits"]["amq"]["top1"] >= acc["digits"]["ort"]["top1"]
    r_ok = acc["resnet18"]["amq"]["sqnr_db"] >= acc["resnet18"]["ort"]["sqnr_db"]
    a(
        f"| amq at least as accurate (minmax) | digits top-1 {100 * acc['digits']['amq']['top1']:.2f} vs {100 * acc['digits']['ort']['top1']:.2f} %; "
        f"resnet18 SQNR {acc['resnet18']['amq']['sqnr_db']:.2f} vs {acc['resnet18']['ort']['sqnr_db']:.2f} dB | {'met' if d_ok and r_ok else 'NOT met'} |"
    )
    a("")
    if prof_lines:
        a("## 4. Profile")
        a("")
        L.extend(prof_lines)
        a("")
    om = obs_micro
    a("## 5. What the subsampled histogram costs and changes")
    a("")
    a(
        f"`runner.collect_stats` on the {om['tensors']} tensors amq observes on resnet18, {om['samples']} samples, batches of {BATCH}: "
        "as it is (onnxruntime reduces each tensor to its exact extremes and a subsample) and with a histogram of every value "
        "(`per_sample` too big to subsample: every tensor copied out whole and binned by numpy)."
    )
    a("")
    a("| variant | wall s | observer CPU s | values binned (M) |")
    a("| --- | ---: | ---: | ---: |")
    for v in ("amq", "full"):
        a(
            f"| {v} | {om[f'{v}_s']:.2f} | {om[f'{v}_observer_cpu_s']:.2f} | {om[f'{v}_binned'] / 1e6:.1f} |"
        )
    d, tname = om["p9999_dev"]
    a("")
    a(
        f"Extremes are identical in both (asserted). The largest move of a percentile-99.99 range end caused by subsampling: "
        f"{100 * d:.2f} % of the tensor's range (= {255 * d:.1f} INT8 steps), on `{tname}`."
    )
    a("")
    fl = floor
    a("## 6. What calibrating the bundled model costs at the least")
    a("")
    a(
        f"digits, {fl['samples']} samples, batches of {BATCH}, {fl['tensors']} tensors observed ({fl['exposed']} of them inside the graph); "
        f"one process, the five passes interleaved, medians of {fl['reps']} rounds (after two warm-up rounds) and, in brackets, "
        "the smallest and largest ratio of a round. Each pass creates its own session, as the float pass does."
    )
    a("")
    a("| pass | ms | / float |")
    a("| --- | ---: | ---: |")
    labels = {
        "float": "float inference (the reference)",
        "expose": "the same, the observed tensors exposed as outputs, nothing done with them",
        "expose_minmax": "the same plus numpy min and max of each (a bare minmax calibrator)",
        "amq_hist64": "amq calibration, histograms cut to 64 values per sample",
        "amq": "amq calibration as shipped (every value binned)",
    }
    for k, label in labels.items():
        lo, hi = fl["ratio_range"][k]
        a(f"| {label} | {fl['ms'][k]:.2f} | {fl['ratio'][k]:.2f}x ({lo:.2f}-{hi:.2f}) |")
    a("")
    a("## Raw log")
    a("")
    a("```")
    L.extend(x.strip() for x in log)
    a("```")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
