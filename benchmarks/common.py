"""Shared helpers for the benchmarks: model table, data preparation, measured subprocesses, metrics.

Everything here runs in the main environment (the one with qdqsurgeon installed). The baselines
run in subprocesses so that wall time and peak RSS are per tool:

- qdqsurgeon: its own CLI (``qdqsurgeon optimize``);
- ONNX Runtime ``quantize_static``: ``benchmarks/ort_ptq.py`` with this interpreter;
- NVIDIA ModelOpt ONNX PTQ: ``benchmarks/modelopt_ptq.py`` with the ModelOpt venv's interpreter.

Every tool calibrates on the same ``calib.npz`` and is scored on the same ``eval.npz``, both
written once per model by :func:`prepare_data` with qdqsurgeon's own image reader
(:func:`qdqsurgeon.calibration.open_data` + :class:`~qdqsurgeon.calibration.Preprocess`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_SHARED = REPO_DIR.parent / "shared"
DEFAULT_MODELOPT_PYTHON = Path("/root/venv-modelopt/bin/python")

IMAGENET = "mean=0.485/0.456/0.406,std=0.229/0.224/0.225"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: file name in ``shared/models/fp32``, how its inputs are made, how it is scored."""

    name: str
    file: str
    kind: str  # "image" or "text"
    preprocess: str | None = None  # qdqsurgeon --preprocess spec (images only)
    opset: int | None = None  # qdqsurgeon --opset (and the opset ORT's input is upgraded to)
    classifier: bool = False  # top-1 agreement is meaningful
    note: str = ""


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("efficientnet_lite0", "efficientnet_lite0.onnx", "image",
                  f"size=224,{IMAGENET},scale=1/255,order=RGB,layout=NCHW,resize=crop", classifier=True),
        ModelSpec("mobilenetv2_bottleneck", "mobilenetv2_bottleneck.onnx", "image",
                  f"size=224,{IMAGENET},scale=1/255,order=RGB,layout=NCHW,resize=crop",
                  note="embedding output: no top-1"),
        ModelSpec("resnet18_cifar10", "resnet18_cifar10.onnx", "image",
                  "size=32,mean=0.5/0.5/0.5,std=0.5/0.5/0.5,scale=1/255,order=RGB,layout=NCHW,resize=crop",
                  opset=13, classifier=True, note="opset 12 model; qdqsurgeon --opset 13, ORT input upgraded to 13"),
        ModelSpec("yolov8n_320", "yolov8n_320.onnx", "image",
                  "size=320,scale=1/255,order=RGB,layout=NCHW,resize=letterbox"),
        ModelSpec("all_minilm_l6_v2", "all_minilm_l6_v2.onnx", "text", note="int64 token inputs, seq 32"),
    )
}

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
NUM_CALIB = 8
NUM_EVAL = 8
SEQ_LEN = 32

# 16 sentences of our own: the first 8 calibrate, the last 8 evaluate.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "TensorRT builds faster engines when quantization nodes sit in the right places.",
    "A cup of coffee on a wooden table next to an open notebook.",
    "The bus stopped at the corner and three passengers got off.",
    "Residual connections let very deep networks train without vanishing gradients.",
    "My cat sleeps on the windowsill every afternoon when the sun is out.",
    "Calibration data should look like the inputs the model sees in production.",
    "The astronaut floated through the station holding a camera.",
    "A goldfish swims slowly in a round glass bowl.",
    "Sports cars are loud, fast and expensive to insure.",
    "How many layers does a small transformer encoder usually have?",
    "The rocket lifted off at dawn and disappeared into the clouds.",
    "Sentence embeddings map similar meanings to nearby vectors.",
    "She rode her motorcycle along the coast for two hundred kilometres.",
    "Integer arithmetic is cheaper than floating point on most accelerators.",
    "A tiger rests in the tall grass, watching the river.",
]


# --------------------------------------------------------------------------- paths


def model_path(shared: Path, spec: ModelSpec) -> Path:
    return shared / "models" / "fp32" / spec.file


def photos(shared: Path) -> list[Path]:
    """Image files directly in ``shared/models/images``, sorted by name."""
    folder = shared / "models" / "images"
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)


# --------------------------------------------------------------------------- tokenizer


class WordPiece:
    """A small BERT (uncased) tokenizer: basic tokenization + greedy longest-match WordPiece."""

    def __init__(self, vocab_path: Path, lower: bool = True):
        tokens = Path(vocab_path).read_text(encoding="utf-8").splitlines()
        self.vocab = {t: i for i, t in enumerate(tokens) if t or i == 0}
        self.lower = lower
        self.unk = self.vocab["[UNK]"]

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    def _basic(self, text: str) -> list[str]:
        text = "".join(" " if ch.isspace() else ch for ch in text
                       if not (ord(ch) in (0, 0xFFFD) or unicodedata.category(ch) in ("Cc", "Cf") and not ch.isspace()))
        out: list[str] = []
        for word in text.split():
            if self.lower:
                word = word.lower()
                word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            cur = ""
            for ch in word:
                if self._is_punct(ch):
                    if cur:
                        out.append(cur)
                        cur = ""
                    out.append(ch)
                else:
                    cur += ch
            if cur:
                out.append(cur)
        return out

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [self.vocab["[CLS]"]]
        for word in self._basic(text):
            ids.extend(self._wordpiece(word))
        return ids + [self.vocab["[SEP]"]]


def tokenize(sentences: list[str], tokenizer_dir: Path, seq_len: int = SEQ_LEN) -> tuple[dict[str, np.ndarray], str]:
    """int64 input_ids/attention_mask/token_type_ids ``[n, seq_len]`` and which tokenizer made them."""
    try:
        from tokenizers import Tokenizer  # type: ignore[import-not-found]

        tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        encoded = [tok.encode(s).ids for s in sentences]
        which = "tokenizers"
    except ImportError:
        wp = WordPiece(tokenizer_dir / "vocab.txt")
        encoded = [wp.encode(s) for s in sentences]
        which = "built-in WordPiece"
    n = len(sentences)
    ids = np.zeros((n, seq_len), dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.int64)
    for i, seq in enumerate(encoded):
        if len(seq) > seq_len:
            seq = seq[: seq_len - 1] + seq[-1:]  # keep [SEP]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}, which


# --------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    calib: Path
    eval: Path
    description: str


def prepare_data(spec: ModelSpec, shared: Path, workdir: Path) -> PreparedData:
    """Write ``calib.npz`` and ``eval.npz`` for ``spec`` into ``workdir`` (arrays keyed by input name)."""
    import onnx

    from qdqsurgeon.calibration import Preprocess, open_data

    workdir.mkdir(parents=True, exist_ok=True)
    calib_path, eval_path = workdir / "calib.npz", workdir / "eval.npz"
    if spec.kind == "text":
        arrays, which = tokenize(SENTENCES, model_path(shared, spec).parent / "all_minilm_l6_v2_tokenizer")
        np.savez(calib_path, **{k: v[:NUM_CALIB] for k, v in arrays.items()})
        np.savez(eval_path, **{k: v[NUM_CALIB : NUM_CALIB + NUM_EVAL] for k, v in arrays.items()})
        return PreparedData(calib_path, eval_path, f"{NUM_CALIB}+{NUM_EVAL} sentences, {which}, seq {SEQ_LEN}")

    files = photos(shared)
    if len(files) < NUM_CALIB + NUM_EVAL:
        raise RuntimeError(f"need {NUM_CALIB + NUM_EVAL} photos in {shared / 'models' / 'images'}, found {len(files)}")
    model = onnx.load(str(model_path(shared, spec)), load_external_data=False)
    pre = Preprocess.parse(spec.preprocess or "")

    def stack(paths: list[Path]) -> dict[str, np.ndarray]:
        batches: list[dict[str, np.ndarray]] = []
        for p in paths:
            batches.extend(open_data(p, model, pre))
        return {k: np.concatenate([b[k] for b in batches], axis=0) for k in batches[0]}

    np.savez(calib_path, **stack(files[:NUM_CALIB]))
    np.savez(eval_path, **stack(files[NUM_CALIB : NUM_CALIB + NUM_EVAL]))
    return PreparedData(calib_path, eval_path, f"photos {files[0].name}..{files[NUM_CALIB - 1].name} / "
                                               f"{files[NUM_CALIB].name}..{files[NUM_CALIB + NUM_EVAL - 1].name}")


# --------------------------------------------------------------------------- measured subprocesses


@dataclass
class RunResult:
    returncode: int
    wall_s: float
    peak_rss_mb: float | None
    stdout: str
    stderr: str
    timed_out: bool = False

    def error_line(self) -> str:
        """First meaningful line of the failure, for the table."""
        if self.timed_out:
            return "timed out"
        text = (self.stderr or "") + "\n" + (self.stdout or "")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        # Prefer the last exception line of a traceback, else our own 'error:' lines, else the last line.
        for ln in reversed(lines):
            if re.match(r"^[A-Za-z_.]*(Error|Exception|Fail)\b.*:", ln) or ln.startswith("error:"):
                return ln
        return lines[-1] if lines else f"exit code {self.returncode}"


_TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else shutil.which("time")

# Fallback when GNU time is missing: a fresh Python parent per tool, so RUSAGE_CHILDREN covers that tool only.
_RUSAGE_WRAPPER = (
    "import json,resource,subprocess,sys\n"
    "rc=subprocess.call(sys.argv[2:])\n"
    "ru=resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1],'w').write(json.dumps({'maxrss_kb':ru.ru_maxrss}))\n"
    "sys.exit(rc)\n"
)


def run_measured(cmd: list[str], *, timeout: float = 3600, env: dict[str, str] | None = None) -> RunResult:
    """Run ``cmd``; wall time and the peak RSS of that process tree (largest single process)."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats"
        gnu_time = _TIME is not None and _gnu_time_works()
        if gnu_time:
            full = [_TIME, "-f", "%M", "-o", str(stats), *cmd]
        else:
            full = [sys.executable, "-c", _RUSAGE_WRAPPER, str(stats), *cmd]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            return RunResult(-1, time.perf_counter() - t0, None, _text(exc.stdout), _text(exc.stderr), timed_out=True)
        wall = time.perf_counter() - t0
        rss = None
        try:
            raw = stats.read_text().strip()
            if gnu_time:
                # GNU time appends "Command exited with non-zero status N" before the format line on failure.
                rss = float(raw.splitlines()[-1]) / 1024.0
            else:
                rss = json.loads(raw)["maxrss_kb"] / 1024.0
        except (OSError, ValueError, IndexError, KeyError):
            pass
        return RunResult(proc.returncode, wall, rss, proc.stdout, proc.stderr)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


_GNU_TIME_OK: bool | None = None


def _gnu_time_works() -> bool:
    global _GNU_TIME_OK
    if _GNU_TIME_OK is None:
        try:
            with tempfile.NamedTemporaryFile() as f:
                r = subprocess.run([_TIME, "-f", "%M", "-o", f.name, "true"], capture_output=True, timeout=30)
                _GNU_TIME_OK = r.returncode == 0 and Path(f.name).read_text().strip().isdigit()
        except (OSError, subprocess.SubprocessError):
            _GNU_TIME_OK = False
    return _GNU_TIME_OK


def rss_method() -> str:
    return "GNU time %M" if (_TIME is not None and _gnu_time_works()) else "getrusage(RUSAGE_CHILDREN) in a wrapper process"


def io_seconds(path: Path, repeats: int = 3) -> float:
    """Best of ``repeats`` ``onnx.load`` + ``onnx.save`` (to a temp file) of the model, in seconds."""
    import onnx

    best = math.inf
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "copy.onnx"
        for _ in range(repeats):
            t0 = time.perf_counter()
            m = onnx.load(str(path))
            onnx.save(m, str(out))
            best = min(best, time.perf_counter() - t0)
            del m
    return best


def last_json_line(text: str) -> dict[str, Any]:
    """The last stdout line that parses as a JSON object (what the worker scripts print)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


# --------------------------------------------------------------------------- scoring


@dataclass
class Score:
    sqnr_db: float | None = None  # worst output
    cosine: float | None = None  # worst output
    top1: float | None = None
    quantize: int = 0
    dequantize: int = 0
    problems: int = 0
    problem_rules: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)


def score(fp32_path: Path, qdq_path: Path, eval_npz: Path, classifier: bool) -> Score:
    """SQNR/cosine/top-1 of ``qdq_path`` against ``fp32_path`` on ``eval_npz``, plus its Q/DQ census."""
    import onnx

    from qdqsurgeon.calibration import open_data
    from qdqsurgeon.check import compare
    from qdqsurgeon.inspection import inspect_model

    ref = onnx.load(str(fp32_path))
    cand = onnx.load(str(qdq_path))
    report = compare(ref, cand, open_data(eval_npz, ref))
    ins = inspect_model(cand)
    rules: dict[str, int] = {}
    for p in ins.problems:
        rules[p.rule] = rules.get(p.rule, 0) + 1
    return Score(
        sqnr_db=report.worst_sqnr,
        cosine=min(m.cosine for m in report.outputs.values()),
        top1=report.top1_agreement if classifier else None,
        quantize=ins.quantize,
        dequantize=ins.dequantize,
        problems=len(ins.problems),
        problem_rules=dict(sorted(rules.items())),
        outputs=report.to_dict()["outputs"],
    )


# --------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def env_without_pythonpath() -> dict[str, str]:
    """Environment for the ModelOpt venv: drop variables that would leak the main environment's packages."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    return env
