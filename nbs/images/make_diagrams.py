"""Draw the course's concept diagrams as SVG files beside this script: `python nbs/images/make_diagrams.py [OUT_DIR]`.

Decisions:
- one matplotlib function per diagram, registered in DIAGRAMS under its file name; the lessons embed the SVGs;
- byte-for-byte reproducible: a fixed `svg.hashsalt`, no date or creator metadata, text kept as text
  (`svg.fonttype = none`), so tests/test_diagrams.py can compare fresh output with the committed files;
- only matplotlib's own shapes (no external fonts or images), so any machine draws the same file.
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

HERE = Path(__file__).resolve().parent
BLUE, ORANGE, GREEN, GREY, RED, PURPLE = "#3b7dd8", "#e8883a", "#4caf50", "#9e9e9e", "#d9534f", "#8e6cc0"
DIAGRAMS = {}


def diagram(name: str):
    "Register a function that draws on a new figure as the diagram `name`.svg."
    def register(fn):
        DIAGRAMS[name] = fn
        return fn
    return register


def box(ax, x, y, w, h, text, color=BLUE, fontsize=9, text_color="white", alpha=1.0):
    "A rounded box centred on (x, y) with a label."
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec="none", alpha=alpha))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color=text_color)


def arrow(ax, start, end, color="#555", style="-|>", lw=1.2):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=10, color=color, lw=lw))


def canvas(width, height, xlim, ylim):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(*xlim); ax.set_ylim(*ylim); ax.axis("off")
    return fig, ax


@diagram("chain")
def chain():
    "Chapter 0: the chain `camp run` walks, and what each stage hands the next."
    fig, ax = canvas(10, 1.8, (0, 10), (0, 1.8))
    stages = [("corpus", "docs.jsonl"), ("data", "clean shards"), ("tokenizer", "tokens/*.bin"),
              ("pretrain", "model/ (HF)"), ("later chapters", "fine-tune, serve,\nevaluate, agents, RAG")]
    for i, (name, artifact) in enumerate(stages):
        x = 1 + i * 2
        box(ax, x, 1.15, 1.6, 0.6, name, GREY if i == 4 else BLUE, fontsize=10)
        ax.text(x, 0.45, artifact, ha="center", va="center", fontsize=8, color="#333")
        if i < 4: arrow(ax, (x + 0.82, 1.15), (x + 1.18, 1.15))
    ax.text(5, 1.7, "camp run: each stage reads the previous stage's folder under runs/NAME/ and adds its own",
            ha="center", fontsize=9, color="#333")
    return fig


@diagram("funnel")
def funnel():
    "Chapter 1: the cleaning funnel; every document leaves kept or with the (step, reason) that dropped it."
    steps = [("readable", "bad_encoding, too_long"), ("normalise", "(rewrites: NFKC / NFC)"), ("language", "not_en, low_score"),
             ("repetition", "dup_lines, top_ngram"), ("quality", "too_few_words, no_stop_words"),
             ("c4", "too_few_sentences"), ("code", "minified, generated, blob"), ("pii", "(rewrites: <EMAIL>, <IPV4> ...)"),
             ("exact_dedup", "exact_duplicate"), ("near_dedup", "near_duplicate (MinHash LSH)")]
    fig, ax = canvas(9, 6.2, (0, 9), (-0.6, len(steps) + 0.9))
    n = len(steps)
    box(ax, 3, n + 0.35, 5.4, 0.55, "input: every document read (corpus, folders, PDFs, HTML)", GREY, fontsize=9)
    for i, (name, reasons) in enumerate(steps):
        y = n - 1 - i + 0.3
        width = 5.2 - 0.33 * i                                          # the stream narrows as steps drop documents
        rewrites = reasons.startswith("(")
        box(ax, 3, y, width, 0.55, name, GREEN if rewrites else BLUE, fontsize=10)
        arrow(ax, (3, y + 0.62), (3, y + 0.3))
        ax.text(6.3, y, reasons, ha="left", va="center", fontsize=8, color="#555" if rewrites else RED)
        if not rewrites: arrow(ax, (3 + width / 2 + 0.05, y), (6.2, y), color=RED, lw=0.8)
    box(ax, 3, -0.3, 2.0, 0.5, "kept shards", ORANGE, fontsize=10)
    arrow(ax, (3, 0.0), (3, -0.05))
    ax.text(8.9, n + 0.35, "kept + dropped = input,\nor the run fails", ha="right", va="center", fontsize=8, color="#333")
    return fig


@diagram("bpe_merge")
def bpe_merge():
    "Chapter 2: one BPE training step on Sennrich's toy corpus: count pairs, merge the most frequent one everywhere."
    fig, ax = canvas(10, 4.4, (0, 10), (0, 4.4))
    words = [("l o w", 5), ("l o w e r", 2), ("n e w e s t", 6), ("w i d e s t", 3)]
    merged = [("l o w", 5), ("l o w e r", 2), ("n e w e st", 6), ("w i d e st", 3)]
    ax.text(1.6, 4.15, "1. pre-tokens and counts", ha="center", fontsize=10, weight="bold")
    ax.text(5.0, 4.15, "2. count adjacent pairs", ha="center", fontsize=10, weight="bold")
    ax.text(8.4, 4.15, "3. merge the top pair", ha="center", fontsize=10, weight="bold")

    def tokens(x, y, pieces, highlight=()):
        for piece in pieces.split():
            w = 0.28 + 0.14 * len(piece)
            box(ax, x + w / 2, y, w, 0.42, piece, ORANGE if piece in highlight else BLUE, fontsize=9)
            x += w + 0.06
        return x

    for i, (w, n) in enumerate(words):
        end = tokens(0.1, 3.4 - i * 0.75, w)
        ax.text(end + 0.1, 3.4 - i * 0.75, f"x{n}", va="center", fontsize=9)
    pairs = [("s t", 9), ("e s", 9), ("w e", 8), ("l o", 7), ("o w", 7), ("n e", 6), ("...", None)]
    for i, (p, n) in enumerate(pairs):
        y = 3.5 - i * 0.45
        ax.text(4.3, y, f"({p.replace(' ', ', ')})" if n else p, fontsize=9, va="center", family="monospace",
                color=ORANGE if i == 0 else "#333", weight="bold" if i == 0 else "normal")
        if n: ax.text(5.7, y, f"{n}", fontsize=9, va="center", ha="right")
    ax.text(5.0, 0.25, "tie: (s,t) = (e,s) = 9; the greater pair, (s,t), wins", ha="center", fontsize=8, color="#555")
    for i, (w, n) in enumerate(merged):
        end = tokens(6.6, 3.4 - i * 0.75, w, highlight=("st",))
        ax.text(end + 0.1, 3.4 - i * 0.75, f"x{n}", va="center", fontsize=9)
    ax.text(8.4, 0.45, "new token 'st' = id 256 + merge rank;\nrepeat until the vocabulary is full", ha="center", fontsize=8, color="#555")
    arrow(ax, (3.4, 2.3), (4.1, 2.3)); arrow(ax, (6.0, 2.3), (6.5, 2.3))
    return fig


@diagram("decoder_block")
def decoder_block():
    "Chapter 3: one pre-norm decoder block: RMSNorm, grouped-query attention with RoPE, SwiGLU, two residual adds."
    fig, ax = canvas(11, 7.2, (0, 11), (0, 7.2))
    x = 2.2
    box(ax, x, 0.35, 2.6, 0.45, "x  (b, t, d_model)", GREY)
    box(ax, x, 1.2, 2.6, 0.5, "RMSNorm", GREEN)
    box(ax, x, 2.3, 2.6, 0.8, "grouped-query\nattention + RoPE", BLUE)
    box(ax, x, 3.4, 0.5, 0.5, "+", ORANGE, fontsize=12)
    box(ax, x, 4.3, 2.6, 0.5, "RMSNorm", GREEN)
    box(ax, x, 5.3, 2.6, 0.8, "SwiGLU MLP", PURPLE)
    box(ax, x, 6.35, 0.5, 0.5, "+", ORANGE, fontsize=12)
    for a, b in ((0.58, 0.95), (1.45, 1.9), (2.7, 3.15), (3.65, 4.05), (4.55, 4.9), (5.7, 6.1)):
        arrow(ax, (x, a), (x, b))
    arrow(ax, (x, 6.6), (x, 7.05))
    ax.text(x + 0.2, 7.0, "to the next block", fontsize=8, va="top")
    for lo, hi in ((0.6, 3.4), (3.65, 6.35)):                           # the residual stream bypasses each sub-layer
        ax.plot([x - 1.6, x - 1.6], [lo + 0.2 if lo < 1 else lo + 0.1, hi], color=ORANGE, lw=1.5)
        ax.plot([x - 1.6, x - 1.3 + 0.85], [lo + 0.2 if lo < 1 else lo + 0.1] * 2, color=ORANGE, lw=1.5)
        arrow(ax, (x - 1.6, hi), (x - 0.27, hi), color=ORANGE)
    ax.text(x - 1.75, 2.0, "residual", rotation=90, fontsize=8, color=ORANGE, va="center", ha="right")
    ax.text(x, -0.05, "x / rms(x) * w  (no mean, no bias)", ha="center", fontsize=7, color="#555")

    # grouped-query attention: 4 query heads share 2 key/value heads
    ax.text(6.6, 6.9, "GQA: 4 query heads share 2 K/V heads", ha="center", fontsize=10, weight="bold")
    for h in range(4):
        box(ax, 4.9 + h * 0.85, 6.3, 0.7, 0.42, f"Q{h}", BLUE)
    for g in range(2):
        box(ax, 5.32 + g * 1.7, 5.35, 1.3, 0.42, f"K{g}  V{g}", RED)
        for h in (2 * g, 2 * g + 1):
            ax.plot([4.9 + h * 0.85, 5.32 + g * 1.7], [6.08, 5.57], color="#777", lw=0.8)
    ax.text(6.6, 4.7, "KV cache: n_kv_heads x head_dim per token per layer\n(here half of multi-head attention's)",
            ha="center", fontsize=8, color="#333")

    # RoPE: each pair of dimensions rotates by position x frequency
    cx, cy, r = 6.0, 2.6, 1.0
    ax.add_patch(Circle((cx, cy), r, fill=False, ec="#bbb"))
    import math
    for p in range(5):
        a = 0.45 * p
        arrow(ax, (cx, cy), (cx + r * math.cos(a), cy + r * math.sin(a)), color=plt.cm.viridis(p / 4))
        ax.text(cx + 1.18 * r * math.cos(a), cy + 1.18 * r * math.sin(a), f"p={p}", fontsize=7, ha="center", va="center")
    ax.text(cx, cy - 1.45, "RoPE: rotate each (q, k) pair by p * θ_i;\nq·k then depends only on the distance", ha="center", fontsize=8)

    # SwiGLU
    sx = 9.3
    box(ax, sx - 0.7, 1.4, 1.2, 0.42, "gate", PURPLE); box(ax, sx + 0.7, 1.4, 1.2, 0.42, "up", PURPLE)
    box(ax, sx - 0.7, 2.3, 1.2, 0.42, "SiLU", GREY); box(ax, sx, 3.2, 0.5, 0.42, "×", ORANGE, fontsize=11)
    box(ax, sx, 4.1, 1.4, 0.42, "down", PURPLE)
    arrow(ax, (sx - 0.7, 1.62), (sx - 0.7, 2.08)); arrow(ax, (sx - 0.7, 2.52), (sx - 0.2, 3.0)); arrow(ax, (sx + 0.7, 1.62), (sx + 0.2, 3.0))
    arrow(ax, (sx, 3.42), (sx, 3.88))
    ax.text(sx, 0.85, "SwiGLU: down(silu(gate x) * up x)", ha="center", fontsize=8)
    ax.text(sx, 4.6, "d_model -> d_ff -> d_model", ha="center", fontsize=8, color="#555")
    for (x0, y0), (x1, y1) in (((x + 1.3, 2.3), (4.9, 2.6)), ((x + 1.3, 5.3), (sx - 1.1, 4.1))):
        ax.plot([x0, x1], [y0, y1], ls=":", color="#999", lw=1)
    return fig


@diagram("parallelism")
def parallelism():
    "Chapter 4: which process holds which part of parameters, gradients and optimizer state, on 4 GPUs."
    rows = [("DDP", (1, 1, 1)), ("ZeRO-1", (1, 1, 4)), ("ZeRO-2", (1, 4, 4)), ("ZeRO-3 / FSDP", (4, 4, 4))]
    parts = [("params", BLUE), ("grads", GREEN), ("optimizer state", ORANGE)]
    fig, ax = canvas(11, 4.6, (0, 11), (0, 4.9))
    for g in range(4):
        ax.text(2.9 + g * 1.75, 4.6, f"GPU {g}", ha="center", fontsize=10, weight="bold")
    for r, (name, split) in enumerate(rows):
        y = 3.8 - r * 1.0
        ax.text(0.1, y, name, va="center", fontsize=10, weight="bold")
        for g in range(4):
            x0 = 2.2 + g * 1.75
            for p, ((label, color), n) in enumerate(zip(parts, split)):
                yy = y + 0.25 - p * 0.25
                ax.add_patch(Rectangle((x0, yy - 0.1), 1.4, 0.2, fc="none", ec="#ccc", lw=0.6))
                width = 1.4 / n
                start = x0 + (g % n) * width if n > 1 else x0
                ax.add_patch(Rectangle((start, yy - 0.1), width, 0.2, fc=color, ec="none"))
        mem = {(1, 1, 1): "2 + 2 + 12 = 16", (1, 1, 4): "2 + 2 + 12/4 = 7", (1, 4, 4): "2 + 2/4 + 12/4 = 5.5",
               (4, 4, 4): "(2 + 2 + 12)/4 = 4"}[split]
        ax.text(10.1, y, f"{mem}\nbytes/param", ha="center", va="center", fontsize=7.5)
    for p, (label, color) in enumerate(parts):
        ax.add_patch(Rectangle((2.2 + p * 2.3, 0.15), 0.3, 0.2, fc=color)); ax.text(2.6 + p * 2.3, 0.25, label, va="center", fontsize=9)
    ax.text(10.1, 4.6, "per GPU\n(bf16 + fp32 Adam)", ha="center", fontsize=8)
    return fig


def draw_all(out_dir: Path = HERE) -> list[Path]:
    "Draw every diagram into out_dir as NAME.svg, reproducibly; returns the paths written."
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "llm-camp", "svg.fonttype": "none", "font.family": "DejaVu Sans"}):
        for name, fn in DIAGRAMS.items():
            fig = fn()
            path = out_dir / f"{name}.svg"
            fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
            plt.close(fig)
            paths.append(path)
    return paths


if __name__ == "__main__":
    for p in draw_all(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(p)
