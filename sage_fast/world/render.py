"""The synthetic world's renderer: scene parameters -> short RGB videos, batched torch.

Owns: the world's vocabulary of attributes (palette, shapes, sizes, directions), the `Scene`
parameter set, sampling scenes from a seed and rendering them.

A scene holds up to `MAX_OBJECTS` objects on a plain mid-grey background. Object o has

    shape  in SHAPES = (circle, square, triangle)      (axis-aligned square, triangle apex up)
    colour in COLOURS (6 saturated RGB colours)          (the background is grey, (0, 0, 0))
    size   s (pixels): every shape has the area pi * s^2, so area alone gives the size
    pos    (x, y) of its area-centroid at frame 0, pixels (x right, y down, pixel i's centre at i + 0.5)
    vel    (vx, vy) pixels per frame, constant

and at frame t its centroid sits at `pos + t * vel`. Objects are composited in order (object 1
over object 0); sampled two-object scenes never overlap (rejection sampling, see `sample_scenes`).

Edges are anti-aliased with a 1-pixel linear ramp of the signed distance d (pixels, < 0 inside):
`coverage = clamp(0.5 - d, 0, 1)`, so a render is a piecewise-linear (hence differentiable almost
everywhere) function of size, pos and vel, which the manifold fit uses. For the triangle d is the
max of its three half-plane distances (exact inside and along edges, ~0.3 px generous at the corners).

    video_bcfhw = render(scene, frames=F, height=H, width=W)   # [B, 3, F, H, W] float32 in [-1, 1]

Determinism: `sample_scenes(n, seed)` draws from its own `torch.Generator`, so the same seed gives
the same scenes bit for bit, independent of the global RNG; `render` has no randomness.

Leaves to others: prompts (`prompts.py`), the latent codec (`codec.py`), rewards, the manifold fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "BACKGROUND", "COLOURS", "COLOUR_NAMES", "SHAPES", "SIZES", "DIRECTIONS", "MAX_OBJECTS",
    "FRAMES", "HEIGHT", "WIDTH", "SPEED", "Scene", "sample_scenes", "render", "coverage",
    "shape_extent", "shape_box", "shape_radius",
]

# ------------------------------------------------------------------------------------------------
# The world's constants (the manifold): changing any of these changes every reward and checkpoint.

#: Default video size: 5 = 4k + 1 frames, 32 x 32 pixels (5 rather than 9: half the tokens, so
#: CPU pretraining sees twice the videos per minute; docs/LOG.md, 2026-11-24).
FRAMES, HEIGHT, WIDTH = 5, 32, 32
#: Background RGB in [-1, 1]: mid grey, at distance sqrt(3) from every palette colour.
BACKGROUND = (0.0, 0.0, 0.0)
COLOUR_NAMES = ("red", "green", "blue", "yellow", "cyan", "magenta")
#: [6, 3] palette, saturated corners of the RGB cube.
COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0],
                        [1.0, 1.0, -1.0], [-1.0, 1.0, 1.0], [1.0, -1.0, 1.0]])
SHAPES = ("circle", "square", "triangle")
#: size word -> s in pixels at 32 x 32 (area pi * s^2); scaled by min(H, W) / 32 for other sizes.
SIZES = {"small": 3.0, "large": 5.0}
#: direction word -> unit (dx, dy) in image coordinates (y down).
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
#: speed in pixels per frame at 32 x 32 (5 px over a 5-frame clip); scaled like SIZES.
SPEED = 1.25
MAX_OBJECTS = 2

# Equal-area geometry: circle radius s; square half-side s * sqrt(pi) / 2;
# equilateral triangle inradius s * sqrt(pi / (3 * sqrt(3))) (area 3 * sqrt(3) * rho^2).
_SQUARE_HALF = math.sqrt(math.pi) / 2.0
_TRI_INRADIUS = math.sqrt(math.pi / (3.0 * math.sqrt(3.0)))
# outward unit normals of the triangle's edges, image coordinates, apex up (at -y)
_TRI_NORMALS = torch.tensor([[0.0, 1.0], [math.sqrt(3) / 2, -0.5], [-math.sqrt(3) / 2, -0.5]])


def shape_box(shape_idx: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Half-extents (x, y) in pixels of each object's box centred on its centroid (for the
    triangle, y is its larger side, centroid to apex): [..., 2]."""
    fx = torch.tensor([1.0, _SQUARE_HALF, math.sqrt(3.0) * _TRI_INRADIUS], dtype=size.dtype, device=size.device)
    fy = torch.tensor([1.0, _SQUARE_HALF, 2.0 * _TRI_INRADIUS], dtype=size.dtype, device=size.device)
    return torch.stack([fx[shape_idx] * size, fy[shape_idx] * size], dim=-1)


def shape_radius(shape_idx: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Radius (pixels) of the circle around the centroid that holds the object."""
    f = torch.tensor([1.0, math.sqrt(2.0) * _SQUARE_HALF, 2.0 * _TRI_INRADIUS], dtype=size.dtype, device=size.device)
    return f[shape_idx] * size


def shape_extent(shape_idx: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Half-extent (pixels) of the bounding box of each object, max over x and y: circle s,
    square s*sqrt(pi)/2, triangle 2 * inradius (centroid to apex)."""
    factor = torch.tensor([1.0, _SQUARE_HALF, 2.0 * _TRI_INRADIUS], dtype=size.dtype, device=size.device)
    return factor[shape_idx] * size


@dataclass
class Scene:
    """Parameters of B scenes of up to O objects (absent objects have present == False).

    shape_bo: int64 [B, O] index into SHAPES; colour_bo: int64 [B, O] index into COLOURS;
    size_bo: float [B, O] s in pixels; pos_bo2, vel_bo2: float [B, O, 2] (x, y) pixels and
    pixels per frame; present_bo: bool [B, O]. Discrete attributes that prompts name are kept
    as words too where known: `size_word_bo` (int64 index into SIZES, -1 if free) and
    `direction_bo` (int64 index into DIRECTIONS, -1 if free).
    """

    shape_bo: torch.Tensor
    colour_bo: torch.Tensor
    size_bo: torch.Tensor
    pos_bo2: torch.Tensor
    vel_bo2: torch.Tensor
    present_bo: torch.Tensor
    size_word_bo: torch.Tensor | None = None
    direction_bo: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.shape_bo.shape[0]

    def _map(self, fn) -> "Scene":
        return Scene(*(None if t is None else fn(t) for t in (getattr(self, f) for f in self.__dataclass_fields__)))

    def to(self, device, non_blocking: bool = False) -> "Scene":
        """The same scenes with every tensor on `device`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Scene":
        """The same scenes in pinned host memory (for non-blocking copies to a GPU)."""
        return self._map(lambda t: t.pin_memory())


def _scale(height: int, width: int) -> float:
    return min(height, width) / 32.0


def coverage(shape_bo: torch.Tensor, size_bo: torch.Tensor, centre_bfo2: torch.Tensor,
             height: int, width: int) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of each object at each frame: [B, F, O, H, W].

    centre_bfo2: [B, F, O, 2] centroids (x, y) in pixels. Differentiable in size and centre.
    """
    dtype, device = size_bo.dtype, size_bo.device
    ys = torch.arange(height, dtype=dtype, device=device) + 0.5
    xs = torch.arange(width, dtype=dtype, device=device) + 0.5
    dx = xs.view(1, 1, 1, 1, width) - centre_bfo2[..., 0, None, None]  # [B, F, O, 1, W]
    dy = ys.view(1, 1, 1, height, 1) - centre_bfo2[..., 1, None, None]  # [B, F, O, H, 1]
    s = size_bo[:, None, :, None, None]  # [B, 1, O, 1, 1]
    d_circle = torch.sqrt(dx * dx + dy * dy + 1e-12) - s
    d_square = torch.maximum(dx.abs(), dy.abs()) - _SQUARE_HALF * s
    n = _TRI_NORMALS.to(device=device, dtype=dtype)
    d_tri = torch.maximum(torch.maximum(n[0, 0] * dx + n[0, 1] * dy, n[1, 0] * dx + n[1, 1] * dy),
                          n[2, 0] * dx + n[2, 1] * dy) - _TRI_INRADIUS * s
    shape = shape_bo[:, None, :, None, None]
    dist = torch.where(shape == 0, d_circle, torch.where(shape == 1, d_square, d_tri))
    return torch.clamp(0.5 - dist, 0.0, 1.0)


def render(scene: Scene, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """Render B scenes: [B, 3, frames, height, width] in [-1, 1], dtype of `scene.size_bo`.

    Deterministic and differentiable in size_bo, pos_bo2 and vel_bo2 (piecewise linear).
    """
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    dtype, device = scene.size_bo.dtype, scene.size_bo.device
    B, O = scene.shape_bo.shape
    t = torch.arange(frames, dtype=dtype, device=device).view(1, frames, 1, 1)
    centre_bfo2 = scene.pos_bo2[:, None] + t * scene.vel_bo2[:, None]  # [B, F, O, 2]
    cov_bfohw = coverage(scene.shape_bo, scene.size_bo, centre_bfo2, height, width)
    cov_bfohw = cov_bfohw * scene.present_bo[:, None, :, None, None].to(dtype)
    colours_bo3 = COLOURS.to(device=device, dtype=dtype)[scene.colour_bo]
    bg = torch.tensor(BACKGROUND, dtype=dtype, device=device).view(1, 3, 1, 1, 1)
    video = bg.expand(B, 3, frames, height, width)
    for o in range(O):  # "over" compositing in object order
        a = cov_bfohw[:, :, o].unsqueeze(1)  # [B, 1, F, H, W]
        video = video * (1.0 - a) + colours_bo3[:, o].view(B, 3, 1, 1, 1) * a
    return video.contiguous()


def sample_scenes(n: int, seed: int, *, two_object_prob: float = 0.5, height: int = HEIGHT,
                  width: int = WIDTH, frames: int = FRAMES, distinct_colours: bool = True) -> Scene:
    """n random scenes, deterministic for `seed` (own generator; the global RNG is untouched).

    Each scene has 1 object, or 2 with probability `two_object_prob`. Attributes are uniform
    over the vocabulary (two objects get distinct colours when `distinct_colours`, which the
    prompt grammar requires); speed is SPEED along the direction; the start position is uniform
    over positions that keep the object fully inside the frame for the whole clip. Two objects
    are placed so that they never overlap (boxes or circumcircles apart by 1 px at every frame); among 256 candidate
    placements the first valid one is kept; when none is valid (~3% of two-object draws, mostly
    large objects whose paths cross) the scene keeps only its first object.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not 0.0 <= two_object_prob <= 1.0:
        raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob}")
    g = torch.Generator().manual_seed(int(seed))
    O, K = MAX_OBJECTS, 256
    scale = _scale(height, width)
    shape = torch.randint(len(SHAPES), (n, O), generator=g)
    colour = torch.randint(len(COLOUR_NAMES), (n, O), generator=g)
    if distinct_colours:  # second colour uniform over the other 5
        colour[:, 1] = (colour[:, 0] + 1 + torch.randint(len(COLOUR_NAMES) - 1, (n,), generator=g)) % len(COLOUR_NAMES)
    size_word = torch.randint(len(SIZES), (n, O), generator=g)
    direction = torch.randint(len(DIRECTIONS), (n, O), generator=g)
    present = torch.ones(n, O, dtype=torch.bool)
    present[:, 1] = torch.rand(n, generator=g) < two_object_prob
    size = torch.tensor(list(SIZES.values()))[size_word] * scale
    vel = torch.tensor(list(DIRECTIONS.values()))[direction] * (SPEED * scale)  # [n, O, 2]
    travel = vel * (frames - 1)
    ext = shape_extent(shape, size)[..., None] + 0.5  # [n, O, 1]
    lo = ext + torch.clamp(-travel, min=0.0)  # start must keep the object inside at both ends
    hi = torch.tensor([float(width), float(height)]) - ext - torch.clamp(travel, min=0.0)
    if bool((hi < lo).any()):
        raise ValueError(f"frame {height}x{width} is too small for {frames} frames of motion at speed {SPEED}")
    u = torch.rand(n, K, O, 2, generator=g)
    cand = lo[:, None] + u * (hi - lo)[:, None]  # [n, K, O, 2]
    # separation test over all frames: two objects are apart when their bounding boxes are
    # (by > 1 px on some axis) or their circumscribed circles are (by > 1 px)
    t = torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1)
    c0 = cand[:, :, None, 0] + t * vel[:, None, None, 0]  # [n, K, F, 2]
    c1 = cand[:, :, None, 1] + t * vel[:, None, None, 1]
    box = shape_box(shape, size)  # [n, O, 2] half-extents (x, y)
    box_gap = ((c0 - c1).abs() - (box[:, None, None, 0] + box[:, None, None, 1])).amax(-1)  # [n, K, F]
    radius = shape_radius(shape, size)  # [n, O]
    circle_gap = (c0 - c1).norm(dim=-1) - (radius[:, None, None, 0] + radius[:, None, None, 1])
    ok = (torch.maximum(box_gap, circle_gap) > 1.0).all(dim=-1)  # [n, K]
    first_ok = ok.float().argmax(dim=1)
    pos = cand[torch.arange(n), first_ok]  # [n, O, 2]
    present[:, 1] &= ok.any(dim=1)  # no valid placement among K: the scene keeps one object
    return Scene(shape_bo=shape, colour_bo=colour, size_bo=size, pos_bo2=pos, vel_bo2=vel,
                 present_bo=present, size_word_bo=size_word, direction_bo=direction)
