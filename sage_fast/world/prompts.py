"""Prompts of the synthetic world: grammar, parsing, prompt files and the frozen text encoder.

Grammar (every prompt the world produces or accepts; words lower case, single spaces):

    prompt := object | object " and " object          (two objects: distinct colours)
    object := "a " [size " "] colour " " shape " moving " direction
    size   := small | large          colour := red | green | blue | yellow | cyan | magenta
    shape  := circle | square | triangle               direction := left | right | up | down

e.g. "a small red circle moving left and a large blue triangle moving down". The empty prompt
"" is the negative / unconditional prompt of classifier-free guidance.

Prompt files (`read_prompts` / `write_prompts`): `.txt` = one prompt per line (blank lines and
lines starting with '#' skipped); `.jsonl` = one JSON object per line with at least
{"prompt": "..."} (other keys, e.g. "seed", are kept and returned). Every prompt is parsed, so a
file with a prompt outside the grammar fails on reading, naming the line.

Text encoder (`WorldTextEncoder`): frozen and seeded, no training, no download. Tokens are the
words, preceded by "<bos>" (so the empty prompt is one real token, never a fully masked
sequence). Stream 1 (the Qwen2.5-VL slot, width text_embed_dim) and stream 2 (the ByT5 slot,
width text_embed_2_dim) are each `word_table[token] + position_table[position]`, both tables
N(0, 1) / sqrt(width) from a fixed seed. The position table matters: the transformer sees text
tokens without positions, and a two-object prompt must bind each colour to its own shape and
direction. Masks: 1 for real tokens, 0 for padding to the longest prompt of the batch.

Leaves to others: rendering the scene a prompt describes (`render.py`), rewards (`rewards.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sage_fast.models import Conditioning, TextEmbeddings

from .render import COLOUR_NAMES, DIRECTIONS, MAX_OBJECTS, SHAPES, SIZES, Scene, sample_scenes

__all__ = [
    "VOCABULARY", "ObjectSpec", "parse_prompt", "describe_scenes", "sample_prompts",
    "read_prompts", "write_prompts", "WorldTextEncoder",
]

VOCABULARY = ("<bos>", "a", "and", "moving", *SIZES, *COLOUR_NAMES, *SHAPES, *DIRECTIONS)
_MAX_TOKENS = 1 + MAX_OBJECTS * 6 + (MAX_OBJECTS - 1)  # <bos> + 2 x (a size colour shape moving dir) + and


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a prompt names it: indices into COLOUR_NAMES, SHAPES, DIRECTIONS and
    SIZES (size -1 when the prompt leaves it free)."""

    colour: int
    shape: int
    direction: int
    size: int = -1


def _parse_object(words: list[str], prompt: str) -> ObjectSpec:
    sizes = tuple(SIZES)
    w = list(words)
    if not w or w[0] != "a":
        raise ValueError(f"prompt {prompt!r}: each object must start with 'a'")
    w = w[1:]
    size = -1
    if w and w[0] in sizes:
        size = sizes.index(w[0])
        w = w[1:]
    if len(w) != 4 or w[2] != "moving":
        raise ValueError(f"prompt {prompt!r}: object must read 'a [size] colour shape moving direction', got "
                         f"{' '.join(words)!r}")
    colour, shape, _, direction = w
    for field_name, value, allowed in (("colour", colour, COLOUR_NAMES), ("shape", shape, SHAPES),
                                       ("direction", direction, tuple(DIRECTIONS))):
        if value not in allowed:
            raise ValueError(f"prompt {prompt!r}: {field_name} must be one of {allowed}, got {value!r}")
    return ObjectSpec(COLOUR_NAMES.index(colour), SHAPES.index(shape), tuple(DIRECTIONS).index(direction), size)


def parse_prompt(prompt: str) -> tuple[ObjectSpec, ...]:
    """The objects a prompt names (1 or 2), or () for the empty prompt. ValueError when the
    prompt is outside the grammar (the message names the field and its allowed values)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    words = prompt.strip().lower().split()
    if not words:
        return ()
    groups, current = [], []
    for word in words:
        if word == "and":
            groups.append(current)
            current = []
        else:
            current.append(word)
    groups.append(current)
    if len(groups) > MAX_OBJECTS:
        raise ValueError(f"prompt {prompt!r}: at most {MAX_OBJECTS} objects, got {len(groups)}")
    objects = tuple(_parse_object(g, prompt) for g in groups)
    if len({o.colour for o in objects}) != len(objects):
        raise ValueError(f"prompt {prompt!r}: the objects of a composition must have distinct colours")
    return objects


def describe_scenes(scene: Scene, with_size: bool = True) -> list[str]:
    """The prompt of each scene (requires the discrete words `size_word_bo`, `direction_bo`)."""
    if scene.direction_bo is None or (with_size and scene.size_word_bo is None):
        raise ValueError("describe_scenes needs scenes with direction_bo (and size_word_bo), e.g. from sample_scenes")
    sizes, directions = tuple(SIZES), tuple(DIRECTIONS)
    # one host copy of each attribute table (indexing tensors element by element costs ~10 us a call)
    present, shape, colour, direction = (t.tolist() for t in (scene.present_bo, scene.shape_bo, scene.colour_bo,
                                                               scene.direction_bo))
    size_word = scene.size_word_bo.tolist() if with_size else None
    prompts = []
    for b in range(scene.batch):
        parts = []
        for o in range(len(shape[b])):
            if not present[b][o]:
                continue
            size = f"{sizes[size_word[b][o]]} " if with_size else ""
            parts.append(f"a {size}{COLOUR_NAMES[colour[b][o]]} {SHAPES[shape[b][o]]} moving {directions[direction[b][o]]}")
        prompts.append(" and ".join(parts))
    return prompts


def sample_prompts(n: int, seed: int, two_object_prob: float = 0.5, **size) -> tuple[list[str], Scene]:
    """n prompts from the grammar and the scenes they describe (deterministic for `seed`).
    Rendering the returned scenes gives a clean, on-prompt video for each prompt; `size`
    (frames, height, width) is passed to `sample_scenes` so the objects stay in frame."""
    scene = sample_scenes(n, seed, two_object_prob=two_object_prob, **size)
    return describe_scenes(scene), scene


def read_prompts(path: str | Path, grammar: bool = True) -> list[dict]:
    """Read a prompt file (.txt or .jsonl, see module doc): a list of dicts with key 'prompt'
    (plus any other keys of a .jsonl line). With `grammar` (the world's prompts) every prompt is
    checked against the grammar; without it (free text for a real model) only non-empty."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"prompt file must end in .txt or .jsonl, got {path.name!r}")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or (path.suffix == ".txt" and line.startswith("#")):
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from e
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: a .jsonl line must be an object with a string 'prompt'")
        else:
            row = {"prompt": line}
        if grammar:
            try:
                parse_prompt(row["prompt"])
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e
        elif not row["prompt"].strip():
            raise ValueError(f"{path}:{lineno}: empty prompt")
        rows.append(row)
    return rows


def write_prompts(path: str | Path, prompts: list[str] | list[dict]) -> None:
    """Write prompts (.txt: one per line; .jsonl: one object per line) after checking them."""
    path = Path(path)
    rows = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    for row in rows:
        parse_prompt(row["prompt"])
    if path.suffix == ".txt":
        path.write_text("".join(r["prompt"] + "\n" for r in rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        raise ValueError(f"prompt file must end in .txt or .jsonl, got {path.name!r}")


class WorldTextEncoder:
    """Frozen seeded text encoder over VOCABULARY (see module doc).

    encode(prompts) -> TextEmbeddings, float32 on `device` (= embed(*token_ids(prompts))):
        embeds_bld [B, L, text_embed_dim], mask_bl [B, L] int64,
        embeds_2_bld [B, L, text_embed_2_dim], mask_2_bl [B, L] int64, L = longest prompt + 1.
    Deterministic: the tables depend only on (seed, widths).
    """

    def __init__(self, text_embed_dim: int, text_embed_2_dim: int, seed: int = 0, device="cpu") -> None:
        g = torch.Generator().manual_seed(int(seed))
        V = len(VOCABULARY)
        self.word_1 = torch.randn(V, text_embed_dim, generator=g) / text_embed_dim**0.5
        self.pos_1 = torch.randn(_MAX_TOKENS, text_embed_dim, generator=g) / text_embed_dim**0.5
        self.word_2 = torch.randn(V, text_embed_2_dim, generator=g) / text_embed_2_dim**0.5
        self.pos_2 = torch.randn(_MAX_TOKENS, text_embed_2_dim, generator=g) / text_embed_2_dim**0.5
        self.word_1, self.pos_1, self.word_2, self.pos_2 = (t.to(device) for t in (self.word_1, self.pos_1,
                                                                                    self.word_2, self.pos_2))
        self.device = device
        self._index = {w: i for i, w in enumerate(VOCABULARY)}

    @classmethod
    def for_model(cls, transformer_config, seed: int = 0, device="cpu") -> "WorldTextEncoder":
        """The encoder matching a transformer's text widths (its `.config`)."""
        return cls(transformer_config.text_embed_dim, transformer_config.text_embed_2_dim, seed, device)

    def tokens(self, prompt: str) -> list[int]:
        parse_prompt(prompt)  # grammar check with a clear error
        return [0] + [self._index[w] for w in prompt.strip().lower().split()]

    def token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of B prompts, int64 [B, L] on the CPU, L = longest prompt + 1 (the
        grammar is checked). The host half of `encode`: data-loading workers can run it."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of str")
        ids = [self.tokens(p) for p in prompts]
        L = max(len(i) for i in ids)
        ids_bl = torch.zeros(len(ids), L, dtype=torch.long)
        mask_bl = torch.zeros(len(ids), L, dtype=torch.long)
        for b, row in enumerate(ids):
            ids_bl[b, :len(row)] = torch.tensor(row)
            mask_bl[b, :len(row)] = 1
        return ids_bl, mask_bl

    def embed(self, ids_bl: torch.Tensor, mask_bl: torch.Tensor) -> TextEmbeddings:
        """TextEmbeddings on `device` from `token_ids`' output (the device half of `encode`)."""
        ids_bl, mask_bl = ids_bl.to(self.device), mask_bl.to(self.device)
        L = ids_bl.shape[1]
        m = mask_bl[..., None].float()
        e1 = (self.word_1[ids_bl] + self.pos_1[:L][None]) * m  # padding rows are zero (and masked)
        e2 = (self.word_2[ids_bl] + self.pos_2[:L][None]) * m
        return TextEmbeddings(e1, mask_bl, e2, mask_bl.clone())

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        return self.embed(*self.token_ids(prompts))

    def conditioning(self, prompts: list[str], negative: bool = True) -> Conditioning:
        """Conditioning for B prompts; `negative` adds the empty prompt (CFG) for every row."""
        return Conditioning(prompt=self.encode(prompts),
                            negative=self.encode([""] * len(prompts)) if negative else None)
