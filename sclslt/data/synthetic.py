"""A deterministic synthetic sign language, rendered as small video clips.

What it is for: the embedded default corpus and the test bed. A training run, the sharding tool
and the tests need sign-language-like data that exists everywhere (no download, no licence),
is small enough to learn on a CPU in minutes, and still has the properties that the method
depends on:

* translation, not transcription: the sign order (TIME SUBJECT ADJ OBJECT ADJ VERB MANNER NEG)
  differs from the text order ("[adj] subject [never] verb [adj] object [manner] [time]"), with
  adjectives after their noun in sign;
* frequent exact duplicates (sentences drawn from a fixed pool with Zipf frequencies) and
  near-duplicates (pool sentences that differ from another by one word: a different meaning,
  signed differently): the known false negatives and the hard negatives of a contrastive loss;
* paraphrase families (`paraphrase_frac` of the pool): another text for the meaning of an earlier
  pool sentence (text-only synonyms, the optional article "the", the time clause moved to the
  front), signed exactly like it. Their texts differ, so no sentence-id mask catches them: the
  false negatives that real corpora have and that only Pair Selection can keep apart. Every pool
  sentence knows its meaning (`pool_meaning`), the ground truth that analyses compare against;
* signer variation: speed, spatial offset, hand size, pixel noise and background per signer,
  plus per-clip jitter and optional rest frames.

Each word's sign is a short motion of two "hands": filled blobs (disc, square, horizontal or
vertical ellipse) with a colour from a saturated palette, moving along a start->end trajectory
(possibly curved). Every word gets a (shape, colour, trajectory) combination that differs from
every other word's in at least three attributes, so a tiny CNN can tell signs apart at 32x32.

Trade-offs: the language is far simpler than a real one (no handshape articulation, no
co-articulation between signs, no facial grammar, a closed 38-word vocabulary), which keeps it
learnable at a tiny size; the realism is in the data statistics (order change, duplicates,
signer variation), not in the pixels. Rendering is vectorised numpy over a precomputed pixel
grid in normalised [0, 1] coordinates, so the same corpus scales to any frame size (32..224)
and about a thousand clips render per second at 32 px on one core.

Determinism: the vocabulary's signs, the sentence pool and the signers come from RNGs seeded by
``cfg.seed``; sample ``(split, index)`` uses its own RNG seeded by ``(cfg.seed, split, index)``,
so a clip is a pure function of (config, split, index): byte-identical across runs and
independent of which other samples were generated before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from sclslt.config import SyntheticConfig

# ---------------------------------------------------------------------------------------------
# the language

# word categories (text words are lowercase ASCII; glosses are the same words upper-cased)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "time": ("today", "yesterday", "tomorrow", "tonight", "now", "later"),
    "subject": ("man", "woman", "child", "teacher", "doctor", "farmer"),
    "verb": ("sees", "likes", "buys", "eats", "finds", "takes", "wants", "holds"),
    "adjective": ("big", "small", "old", "new", "good", "red"),
    "object": ("apple", "book", "house", "car", "ball", "bread", "cup", "tree"),
    "negation": ("never",),
    "manner": ("again", "quickly", "slowly"),
}

# sentence slots -> category, and how often an optional slot is filled (1.0: always)
SLOT_CATEGORY = {
    "subj_adj": "adjective",
    "subj": "subject",
    "neg": "negation",
    "verb": "verb",
    "obj_adj": "adjective",
    "obj": "object",
    "manner": "manner",
    "time": "time",
}
SLOT_PROB = {
    "subj_adj": 0.35,
    "subj": 1.0,
    "neg": 0.2,
    "verb": 1.0,
    "obj_adj": 0.4,
    "obj": 1.0,
    "manner": 0.25,
    "time": 0.5,
}
# "[adj] subject [never] verb [adj] object [manner] [time]"  (3..8 words)
TEXT_ORDER = ("subj_adj", "subj", "neg", "verb", "obj_adj", "obj", "manner", "time")
# sign order: topic-first time, SOV, adjective after its noun, negation last
SIGN_ORDER = ("time", "subj", "subj_adj", "obj", "obj_adj", "verb", "manner", "neg")

# how a paraphrase may word a meaning differently (text only; the signs do not change)
SYNONYMS = {
    "sees": "watches",
    "likes": "enjoys",
    "buys": "purchases",
    "takes": "grabs",
    "big": "large",
    "small": "little",
    "child": "kid",
    "house": "home",
    "doctor": "physician",
    "quickly": "fast",
    "later": "afterwards",
    "cup": "mug",
}
REWORDINGS = ("synonym", "article", "front_time")

SPLITS = {"train": 0, "dev": 1, "test": 2}

# ---------------------------------------------------------------------------------------------
# the look of signs

SHAPES = ("disc", "square", "ellipse_h", "ellipse_v")
# (x semi-axis, y semi-axis) relative to the hand radius, and whether the L-inf norm is used;
# areas are roughly equal so that size is not a cue for shape
_SHAPE_AXES = {
    "disc": (1.0, 1.0, False),
    "square": (0.88, 0.88, True),
    "ellipse_h": (1.4, 0.72, False),
    "ellipse_v": (0.72, 1.4, False),
}
# saturated hand colours (every one has a channel >= 200; backgrounds stay below 110)
PALETTE = np.array(
    [
        (230, 40, 40),
        (40, 200, 60),
        (60, 100, 245),
        (240, 220, 40),
        (220, 50, 210),
        (40, 210, 220),
        (250, 140, 30),
        (245, 245, 245),
    ],
    dtype=np.float32,
)
# right-hand key positions on a 3x3 grid (normalised x, y)
_POSITIONS = np.array([(x, y) for y in (0.3, 0.5, 0.7) for x in (0.3, 0.5, 0.7)], np.float32)
_CURVES = (-0.35, 0.0, 0.35)  # bend of the path, times its length, sideways
# left hand: resting at a fixed spot, mirroring the right hand, moving parallel to it, or
# mirroring it backwards in time
LEFT_MODES = ("rest", "mirror", "parallel", "reverse")
_HAND_RADIUS = 0.09  # of the frame side; ~3 px at 32 px
_REST_LEFT = np.array((0.22, 0.78), np.float32)
_NEUTRAL_BG = np.array((40, 40, 40), np.float32)


@dataclass(frozen=True)
class Sign:
    """One word's sign: attributes of the right (dominant) and left hands."""

    shape_r: int
    colour_r: int
    shape_l: int
    colour_l: int
    start: int  # index into _POSITIONS
    end: int
    curve: int  # index into _CURVES
    left_mode: int  # index into LEFT_MODES

    def key(self) -> tuple:
        return (
            self.shape_r,
            self.colour_r,
            self.shape_l,
            self.colour_l,
            self.start,
            self.end,
            self.curve,
            self.left_mode,
        )


@dataclass(frozen=True)
class Signer:
    name: str
    frames_per_sign: int
    offset: tuple[float, float]  # normalised shift of everything the signer does
    scale: float  # hand size multiplier
    noise: float  # pixel noise std (0..255 units)
    background: tuple[float, float, float]


def _make_signs(words: list[str], rng: np.random.Generator, min_dist: int = 3) -> dict[str, Sign]:
    """Random signs such that every two words differ in at least `min_dist` of 8 attributes."""
    signs: dict[str, Sign] = {}
    keys: list[np.ndarray] = []
    for word in words:
        for _ in range(100_000):
            start, end = rng.choice(len(_POSITIONS), size=2, replace=False)
            s = Sign(
                int(rng.integers(len(SHAPES))),
                int(rng.integers(len(PALETTE))),
                int(rng.integers(len(SHAPES))),
                int(rng.integers(len(PALETTE))),
                int(start),
                int(end),
                int(rng.integers(len(_CURVES))),
                int(rng.integers(len(LEFT_MODES))),
            )
            k = np.array(s.key())
            if all(int((k != other).sum()) >= min_dist for other in keys):
                break
        else:  # pragma: no cover - the attribute space is ~1e6 combinations for 38 words
            raise RuntimeError("could not find distinct signs")
        signs[word] = s
        keys.append(k)
    return signs


def _make_signers(cfg: SyntheticConfig, rng: np.random.Generator) -> list[Signer]:
    out = []
    for i in range(cfg.n_signers):
        out.append(
            Signer(
                name=f"signer{i:02d}",
                frames_per_sign=int(rng.integers(cfg.min_frames_per_sign, cfg.max_frames_per_sign + 1)),
                offset=(float(rng.uniform(-0.07, 0.07)), float(rng.uniform(-0.07, 0.07))),
                scale=float(rng.uniform(0.85, 1.15)),
                noise=float(rng.uniform(2.0, 8.0)),
                background=tuple(float(v) for v in rng.uniform(15, 105, size=3)),
            )
        )
    return out


def _random_sentence(rng: np.random.Generator) -> dict[str, str]:
    sent = {}
    for slot in TEXT_ORDER:
        if rng.random() < SLOT_PROB[slot]:
            words = CATEGORIES[SLOT_CATEGORY[slot]]
            sent[slot] = words[int(rng.integers(len(words)))]
    return sent


def _text_key(sent: dict) -> tuple[str, ...]:
    """The words of a sentence: its slots in text order, as reworded by its "_syn" (slots said with
    a synonym), "_the" (the article before both noun phrases) and "_front" (time first) entries."""
    order = TEXT_ORDER
    if sent.get("_front") and "time" in sent:
        order = ("time",) + tuple(s for s in TEXT_ORDER if s != "time")
    words: list[str] = []
    for slot in order:
        if slot not in sent:
            continue
        if sent.get("_the") and (
            slot in ("subj_adj", "obj_adj") or (slot in ("subj", "obj") and f"{slot}_adj" not in sent)
        ):
            words.append("the")
        words.append(SYNONYMS[sent[slot]] if slot in sent.get("_syn", ()) else sent[slot])
    return tuple(words)


def _reword(sent: dict, rng: np.random.Generator) -> dict:
    """A paraphrase of `sent`: the same slots (the same signs), reworded by a non-empty random subset
    of the rewordings that apply to it."""
    slots = {k: v for k, v in sent.items() if not k.startswith("_")}
    with_synonym = [s for s in TEXT_ORDER if s in slots and slots[s] in SYNONYMS]
    usable = [r for r in REWORDINGS if (r != "synonym" or with_synonym) and (r != "front_time" or "time" in slots)]
    chosen = [r for r in usable if rng.random() < 0.5] or [usable[int(rng.integers(len(usable)))]]
    out = dict(slots)
    if "synonym" in chosen:
        k = int(rng.integers(1, min(2, len(with_synonym)) + 1))
        out["_syn"] = tuple(sorted(rng.choice(with_synonym, size=k, replace=False).tolist()))
    out["_the"] = "article" in chosen
    out["_front"] = "front_time" in chosen
    return out


def _make_pool(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[list[dict], list[int | None], list[int]]:
    """`n_templates` distinct sentences: base sentences, then a `near_dup_frac` of one-word variants
    of another (a different meaning), then a `paraphrase_frac` of paraphrases of non-paraphrases
    (the same meaning and signs, other words), `paraphrases_per_meaning` for each meaning chosen.

    Returns the pool in Zipf rank order (index 0 is the most frequent), per sentence the pool index
    of the sentence it is a near-duplicate of (None otherwise), and per sentence its meaning: the
    pool index of the sentence whose signs it has (itself unless it is a paraphrase). With
    `paraphrase_frac` = 0 the pool is the one earlier versions made, draw for draw.
    """
    n = cfg.n_templates
    n_near = int(round(cfg.near_dup_frac * n)) if n > 1 else 0
    n_para = int(round(cfg.paraphrase_frac * n)) if n > 1 else 0
    n_base = max(1, n - n_near - n_para)
    pool: list[dict] = []
    parent: list[int | None] = []
    meaning: list[int] = []
    seen: set[tuple[str, ...]] = set()
    families, tries = None, 0
    attempts = 0
    while len(pool) < n:
        attempts += 1
        if attempts > 1000 * n + 10_000:  # pragma: no cover - the grammar has ~2.6e6 sentences
            raise ValueError(f"cannot build {n} distinct sentences (n_templates too large)")
        if len(pool) < n_base:
            sent, par, mean = _random_sentence(rng), None, len(pool)
        elif len(pool) < n_base + n_near:
            par = int(rng.integers(len(pool)))
            sent = dict(pool[par])
            slots = [s for s in sent if len(CATEGORIES[SLOT_CATEGORY[s]]) > 1]
            slot = slots[int(rng.integers(len(slots)))]
            choices = [w for w in CATEGORIES[SLOT_CATEGORY[slot]] if w != sent[slot]]
            sent[slot] = choices[int(rng.integers(len(choices)))]
            mean = len(pool)
        else:
            if families is None:  # the meanings that get paraphrases, `paraphrases_per_meaning` each
                n_fam = -(-n_para // cfg.paraphrases_per_meaning)
                families = rng.choice(n_base + n_near, size=min(n_fam, n_base + n_near), replace=False)
            par = None  # a rewording that exists already still uses up its family's turn
            mean = int(families[tries // cfg.paraphrases_per_meaning % len(families)])
            tries += 1
            sent = _reword(pool[mean], rng)
        key = _text_key(sent)
        if key in seen:
            continue
        seen.add(key)
        pool.append(sent)
        parent.append(par)
        meaning.append(mean)
    # shuffle so that Zipf ranks mix base sentences, near-duplicates and paraphrases
    perm = rng.permutation(n)
    new_index = np.empty(n, dtype=np.int64)
    new_index[perm] = np.arange(n)
    pool = [pool[i] for i in perm]
    parent = [None if parent[i] is None else int(new_index[parent[i]]) for i in perm]
    meaning = [int(new_index[meaning[i]]) for i in perm]
    return pool, parent, meaning


# ---------------------------------------------------------------------------------------------
# the corpus


class SyntheticCorpus:
    """The synthetic corpus of one `SyntheticConfig`: vocabulary, sentence pool, signers, clips."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        if cfg.frame_size < 8:
            raise ValueError(f"synthetic.frame_size={cfg.frame_size}: use at least 8")
        if not 1 <= cfg.min_frames_per_sign <= cfg.max_frames_per_sign:
            raise ValueError(
                "synthetic.min_frames_per_sign must be >= 1 and <= max_frames_per_sign "
                f"(got {cfg.min_frames_per_sign}, {cfg.max_frames_per_sign})"
            )
        if cfg.train_offset < 0:
            raise ValueError(f"synthetic.train_offset={cfg.train_offset}: use a value >= 0")
        if cfg.paraphrases_per_meaning < 1:
            raise ValueError(f"synthetic.paraphrases_per_meaning={cfg.paraphrases_per_meaning}: use at least 1")
        if cfg.n_signers < 1 or cfg.n_templates < 1:
            raise ValueError("synthetic.n_signers and synthetic.n_templates must be >= 1")
        if not 0.0 <= cfg.near_dup_frac < 1.0:
            raise ValueError(f"synthetic.near_dup_frac={cfg.near_dup_frac}: use a value in [0, 1)")
        if not 0.0 <= cfg.paraphrase_frac or cfg.near_dup_frac + cfg.paraphrase_frac >= 1.0:
            raise ValueError(
                f"synthetic.paraphrase_frac={cfg.paraphrase_frac}: use a value >= 0 with "
                f"near_dup_frac + paraphrase_frac < 1 (near_dup_frac={cfg.near_dup_frac})"
            )
        for split in SPLITS:
            if self.split_size(split) < 0:
                raise ValueError(f"synthetic.n_{split} must be >= 0")
        self._seed = int(cfg.seed) % (2**63)  # SeedSequence needs non-negative entropy

        self.vocabulary: list[str] = [w for words in CATEGORIES.values() for w in words]
        self.category: dict[str, str] = {w: c for c, words in CATEGORIES.items() for w in words}
        self.signs: dict[str, Sign] = _make_signs(self.vocabulary, np.random.default_rng([self._seed, 1]))
        pool, parent, meaning = _make_pool(cfg, np.random.default_rng([self._seed, 2]))
        self.pool_texts: list[str] = [" ".join(_text_key(s)) for s in pool]
        self.pool_glosses: list[list[str]] = [[s[k].upper() for k in SIGN_ORDER if k in s] for s in pool]
        self.pool_near_dup_of: list[int | None] = parent
        self.pool_meaning: list[int] = meaning  # ground truth: same value = same meaning and signs
        self.signers: list[Signer] = _make_signers(cfg, np.random.default_rng([self._seed, 3]))

        ranks = np.arange(1, cfg.n_templates + 1, dtype=np.float64)
        p = ranks ** -float(cfg.zipf_a)
        self.pool_probs = p / p.sum()
        self._cdf = np.cumsum(self.pool_probs)
        self._cdf[-1] = 1.0

        S = cfg.frame_size
        g = (np.arange(S, dtype=np.float32) + 0.5) / S  # pixel centres in [0, 1]
        self._gy, self._gx = g[:, None], g[None, :]

    # -- splits ---------------------------------------------------------------------------------
    def split_size(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {sorted(SPLITS)}")
        return int(getattr(self.cfg, f"n_{split}"))

    def indices(self, split: str) -> range:
        """Sample indices of a split: 0..n-1, for train from `train_offset` (a disjoint training set of the
        same language, e.g. to pretrain encoders on clips the test bed never trains on)."""
        start = self.cfg.train_offset if split == "train" else 0
        return range(start, start + self.split_size(split))

    def samples(self, split: str) -> Iterator[dict]:
        for i in self.indices(split):
            yield self.sample(split, i)

    def sample(self, split: str, index: int) -> dict:
        if index not in self.indices(split):
            raise IndexError(f"{split} index {index} out of range (split has indices {self.indices(split)})")
        sid, rng = self._draw_sentence(split, index)
        signer = self.signers[int(rng.integers(len(self.signers)))]
        glosses = self.pool_glosses[sid]
        frames = self._render_clip([g.lower() for g in glosses], signer, rng)
        return {
            "key": f"{split}_{index:06d}",
            "frames": frames,
            "text": self.pool_texts[sid],
            "signer": signer.name,
            "glosses": list(glosses),
        }

    def pool_index(self, split: str, index: int) -> int:
        """The pool sentence of sample (split, index), without rendering it."""
        return self._draw_sentence(split, index)[0]

    def meaning_of_key(self, key: str) -> int:
        """Ground-truth meaning (`pool_meaning`) of the clip with sample key `<split>_<index>`."""
        split, index = key.rsplit("_", 1)
        return self.pool_meaning[self.pool_index(split, int(index))]

    def _draw_sentence(self, split: str, index: int) -> tuple[int, np.random.Generator]:
        rng = np.random.default_rng([self._seed, 10, SPLITS[split], int(index)])
        sid = int(min(np.searchsorted(self._cdf, rng.random(), side="right"), len(self._cdf) - 1))
        return sid, rng

    # -- rendering ------------------------------------------------------------------------------
    def render_sign(self, word: str, n_frames: int | None = None) -> np.ndarray:
        """One word's sign alone, by a neutral signer (no offset, noise or jitter): uint8 (T,H,W,3)."""
        if word not in self.signs:
            raise KeyError(f"{word!r} is not in the vocabulary")
        n = n_frames or self.cfg.max_frames_per_sign
        cx, cy, shape, colour = self._sign_track(self.signs[word], n)
        T = n
        return self._draw(
            cx,
            cy,
            shape,
            colour,
            np.full((T, 2), _HAND_RADIUS, np.float32),
            np.ones((T, 2), bool),
            _NEUTRAL_BG,
            None,
            None,
        )

    def _sign_track(self, s: Sign, n: int):
        """Hand centres (n, 2) x/y, shapes (n, 2) and colours (n, 2, 3) of one sign; hand 0 = left."""
        u = np.linspace(0.0, 1.0, n, dtype=np.float32) if n > 1 else np.array([0.5], np.float32)
        a, b = _POSITIONS[s.start], _POSITIONS[s.end]
        d = b - a
        perp = np.array((-d[1], d[0]), np.float32)
        bend = _CURVES[s.curve] * np.sin(np.pi * u)
        right = a[None] + u[:, None] * d[None] + bend[:, None] * perp[None]  # (n, 2)
        mode = LEFT_MODES[s.left_mode]
        if mode == "rest":
            left = np.broadcast_to(_REST_LEFT, right.shape)
        elif mode == "mirror":
            left = np.stack([1.0 - right[:, 0], right[:, 1]], 1)
        elif mode == "parallel":  # beside the right hand, on the side towards the centre
            shift = -0.25 if float(right[:, 0].mean()) >= 0.5 else 0.25
            left = np.stack([right[:, 0] + shift, right[:, 1] + 0.08], 1)
        else:  # reverse
            left = np.stack([1.0 - right[::-1, 0], right[::-1, 1]], 1)
        cx = np.stack([left[:, 0], right[:, 0]], 1)
        cy = np.stack([left[:, 1], right[:, 1]], 1)
        shape = np.tile(np.array([s.shape_l, s.shape_r]), (n, 1))
        colour = np.tile(PALETTE[[s.colour_l, s.colour_r]][None], (n, 1, 1))
        return cx, cy, shape, colour

    def _render_clip(self, words: list[str], signer: Signer, rng: np.random.Generator) -> np.ndarray:
        cfg = self.cfg
        parts = []
        for w in words:
            # per-sign speed jitter around the signer's speed, kept inside the configured range
            n = signer.frames_per_sign + int(rng.choice((-1, 0, 0, 0, 1)))
            n = min(max(n, cfg.min_frames_per_sign), cfg.max_frames_per_sign)
            cx, cy, shape, colour = self._sign_track(self.signs[w], n)
            jx, jy = rng.uniform(-0.015, 0.015, size=2)
            parts.append((cx + jx, cy + jy, shape, colour))
        n_pre, n_post = (int(v) for v in rng.integers(0, 3, size=2))  # rest frames
        cx = np.concatenate([p[0] for p in parts])
        cy = np.concatenate([p[1] for p in parts])
        shape = np.concatenate([p[2] for p in parts])
        colour = np.concatenate([p[3] for p in parts])
        pad = (
            lambda a: np.concatenate(  # noqa: E731
                [np.repeat(a[:1], n_pre, 0), a, np.repeat(a[-1:], n_post, 0)]
            )
        )
        cx, cy, shape, colour = pad(cx), pad(cy), pad(shape), pad(colour)
        T = cx.shape[0]
        visible = np.ones((T, 2), bool)
        visible[:n_pre] = False
        visible[T - n_post :] = False
        # per-clip jitter: position, hand size and hand colour
        ox = signer.offset[0] + rng.uniform(-0.02, 0.02)
        oy = signer.offset[1] + rng.uniform(-0.02, 0.02)
        radius = np.full((T, 2), _HAND_RADIUS * signer.scale * rng.uniform(0.95, 1.05), np.float32)
        colour = colour + rng.uniform(-12, 12, size=(1, 1, 3)).astype(np.float32)
        bg = np.asarray(signer.background, np.float32) + rng.uniform(-6, 6, size=3).astype(np.float32)
        noise = signer.noise * rng.uniform(0.8, 1.2)
        return self._draw(cx + ox, cy + oy, shape, colour, radius, visible, bg, noise, rng)

    def _draw(self, cx, cy, shape, colour, radius, visible, bg, noise, rng) -> np.ndarray:
        """Vectorised blob drawing: (T, 2) centres/shapes/radii -> uint8 (T, S, S, 3)."""
        S = self.cfg.frame_size
        T = cx.shape[0]
        ax = np.array([_SHAPE_AXES[s][0] for s in SHAPES], np.float32)[shape] * radius
        ay = np.array([_SHAPE_AXES[s][1] for s in SHAPES], np.float32)[shape] * radius
        square = np.array([_SHAPE_AXES[s][2] for s in SHAPES])[shape]
        dx = np.abs(self._gx[None, None] - cx[..., None, None].astype(np.float32)) / ax[..., None, None]
        dy = np.abs(self._gy[None, None] - cy[..., None, None].astype(np.float32)) / ay[..., None, None]
        inside = np.where(square[..., None, None], np.maximum(dx, dy) <= 1.0, dx * dx + dy * dy <= 1.0)
        inside &= visible[..., None, None]  # (T, 2, S, S)
        frames = np.empty((T, S, S, 3), np.float32)
        frames[:] = bg
        for h in (0, 1):  # right hand on top
            frames = np.where(inside[:, h, :, :, None], colour[:, h, None, None, :], frames)
        if noise:
            frames += rng.standard_normal(frames.shape, dtype=np.float32) * np.float32(noise)
        return np.clip(frames, 0, 255).astype(np.uint8)
