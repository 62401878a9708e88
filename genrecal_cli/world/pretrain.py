"""Vision pretraining of tiny VLMs: a short auxiliary task, reading what each grid cell of a
shapes scene holds, that teaches a fresh vision encoder and projector to see."""

from __future__ import annotations

# With a random vision tower and projector, a tiny VLM trained from scratch ignored the image
# for 600-1300 steps (a prototype): the features it received told images apart poorly. A short
# auxiliary task, reading each grid cell's content off the features the language model
# receives, teaches the tiny models to see first.


def cell_labels(scene) -> list[int]:
    """The class of each of the 9 grid cells (row-major): 0 empty, else 1 + colour * 3 + shape."""
    from genrecal_cli.world.shapes import COLOURS, GRID, SHAPES

    labels = [0] * GRID * GRID
    for o in scene:
        labels[o.cell] = 1 + list(COLOURS).index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)
    return labels


def image_features(vlm, images):
    """Projected features of PIL `images`, [B, T, H]: what the language model receives at the
    image-token positions, from the family's own image processor and image-feature path."""
    import torch

    # One image per sample, as in training (Idefics3 reads a flat list as one sample's images).
    pixels = vlm.processor.image_processor(images=[[im] for im in images], return_tensors="pt")
    inputs = {k: v for k, v in pixels.items() if k in ("pixel_values", "image_grid_thw", "pixel_attention_mask")}
    out = vlm.model.model.get_image_features(**inputs, return_dict=True).pooler_output
    return torch.stack(list(out))  # a tuple, list or tensor of per-image features, by family


def feature_variation(features) -> float:
    """Mean distance between two images' features over their mean norm, for features [B, T, H];
    near 0 when the image barely changes what the language model receives."""
    import torch

    flat = features.detach().flatten(1).double()
    n = len(flat)
    return float(torch.cdist(flat, flat).sum() / (n * (n - 1)) / flat.norm(dim=1).mean())


def pretrain_vision(
    vlm,
    *,
    steps: int = 900,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    image_size: int = 64,
    eval_size: int = 256,
    cell_positions: bool = False,
) -> dict:
    """Train the vision encoder and projector of `vlm` (a models.VLM; nothing else changes) in
    place to tell what each grid cell of a shapes scene holds, through a throwaway linear head
    on the projected image features. With `cell_positions` a second per-token head also asks
    each image token which cell it lies in, so the features carry their place as well as their
    content (needs image tokens that tile the grid: 48x48 images for Qwen and LLaVA).

    Scenes come from the train split; the metrics, before and after, are measured on
    `eval_size` validation scenes (layouts training never saw). Deterministic for a seed."""
    import math
    import time

    import torch
    import torch.nn.functional as F

    from genrecal_cli.world.shapes import COLOURS, GRID, SHAPES, draw_scene, make_items

    start = time.perf_counter()
    eval_items = make_items("validation", eval_size, seed)
    eval_images = [draw_scene(it.scene, image_size) for it in eval_items]
    eval_labels = torch.tensor([cell_labels(it.scene) for it in eval_items])
    train_items = make_items("train", steps * batch_size, seed)
    cells, classes = GRID * GRID, 1 + len(COLOURS) * len(SHAPES)

    tokens, hidden = image_features(vlm, eval_images[:1]).shape[1:]
    side = math.isqrt(tokens)
    local = side * side == tokens and side % GRID == 0
    if cell_positions and not local:
        raise ValueError(f"cell_positions needs image tokens that tile the {GRID}x{GRID} grid; "
                         f"{tokens} tokens do not (use image_size 48 for Qwen and LLaVA)")
    with torch.random.fork_rng(devices=[]):  # a seeded head without disturbing the caller's RNG
        torch.manual_seed(seed)
        # When the image tokens tile the grid (48x48 images: Qwen 3x3 merged tokens, LLaVA 6x6),
        # one classifier shared by all tokens reads each token's own cell, so every token says
        # what its cell holds in the same code wherever it is. Otherwise (tokens straddle cell
        # edges, where a shared classifier plateaued near 88% cell accuracy) one linear map from
        # all tokens to all cells.
        head = torch.nn.Linear(hidden, classes) if local else torch.nn.Linear(tokens * hidden, cells * classes)
        where = torch.nn.Linear(hidden, cells) if cell_positions else None
    per = side // GRID
    # token (row r, column c) of the side x side raster lies in cell (r // per, c // per)
    token_cell = torch.tensor([(r // per) * GRID + c // per for r in range(side) for c in range(side)]) if local else None

    def cell_logits(features):
        if local:  # [B, T, classes] -> each cell's logits averaged over its tokens
            per_token = head(features)
            out = per_token.new_zeros(features.shape[0], cells, classes).index_add_(1, token_cell, per_token)
            return out / (per * per)
        return head(features.flatten(1)).view(-1, cells, classes)

    # Qwen's projector (visual.merger) lies inside its vision encoder: count each weight once.
    vision = {id(p): p for m in (vlm.vision_encoder, vlm.vision_projector) for p in m.parameters()}
    heads = [*head.parameters(), *(where.parameters() if where is not None else ())]
    optimizer = torch.optim.AdamW([*vision.values(), *heads], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)

    def evaluate() -> dict:
        with torch.no_grad():
            features = image_features(vlm, eval_images)
            out = cell_logits(features)
        right = out.argmax(-1) == eval_labels
        extra = {}
        if where is not None:
            extra["position_accuracy"] = (where(features).argmax(-1) == token_cell).float().mean().item()
        return {
            **extra,
            "loss": F.cross_entropy(out.flatten(0, 1), eval_labels.flatten()).item(),
            "cell_accuracy": right.float().mean().item(),
            # Most cells are empty (~78%): this is the accuracy that shows the model can see.
            "object_accuracy": right[eval_labels > 0].float().mean().item(),
            "feature_variation": feature_variation(features),
        }

    before = evaluate()
    for step in range(steps):
        items = train_items[step * batch_size : (step + 1) * batch_size]
        labels = torch.tensor([cell_labels(it.scene) for it in items])
        features = image_features(vlm, [draw_scene(it.scene, image_size) for it in items])
        loss = F.cross_entropy(cell_logits(features).flatten(0, 1), labels.flatten())
        if where is not None:  # each token also says which cell it lies in
            loss = loss + F.cross_entropy(where(features).flatten(0, 1), token_cell.repeat(len(features)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return {"before": before, "after": evaluate(), "steps": steps, "seconds": time.perf_counter() - start}
