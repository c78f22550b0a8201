r"""The embedded demo (the README's main-job command): a tiny PixelLLM + LISA trained on CPU.

    python -m pixelground.train --config=configs/demo.py --workdir=workdir/demo

On first use it generates the synthetic "grounded shapes" datasets and builds them with the real TFDS
builders into a cache (~/.cache/pixelground or $PIXELGROUND_CACHE). One model with every head — per-word
trace points (Localized Narratives), captions, referring boxes + box-prompted masks (RefCOCO format),
location-conditioned captions, dense captioning (proposal head + region captions) and LISA `[SEG]`
masks — trains on all six tasks (one task per batch, sampled by weight), is evaluated on held-out images
and draws WORKDIR/demo.png: a generated caption with its per-word trace, a referring box and mask, and a
`[SEG]` mask.

The model is trained from scratch, so aids the paper configs leave off are on here (see the README):
`model.tiny.spatial_tokens` (8×8 pooled image tokens with an (x, y) embedding after the queries),
`model.tiny.pointer_head` (the location head attends to those tokens and predicts offsets from the
attended cell centre), `loss.attention_grounding_weight` (that attention looks inside each located
token's box), `model.tiny.refseg_train_box` (the referring-mask decoder trains on ground-truth boxes),
`data.seg_boxes` (the `[SEG]` step also carries its mask's box), `model.tiny.seg_box_prompt` (that
box also prompts the `[SEG]` mask: ground truth in training, predicted at evaluation),
`model.tiny.train_box_noise` (those ground-truth prompts jittered as SAM's are),
`model.tiny.mask_detail` (a high-resolution image branch the mask decoder reads),
`model.tiny.box_refine` (a second look at each object box: a small conv net on a crop of the image
around it regresses a correction) and `model.tiny.pointer_window` (at evaluation an object box reads
the pointer's attention only around its peak). The scenes are made easy for a model this small: 2-3
shapes at twice the default radii, in 4 colours.
"""

import ml_collections

from pixelground.config import recipes


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  image_size = 64
  c.model = recipes.model_config("tiny", lisa=True, image_size=image_size, vocab_size=896,
                                 seg_token_id=3)
  c.model.refseg = True
  c.model.proposals = True
  # Patch 8 (8×8 feature grids at 64 px, 16 px patches would leave 4×4), 16 queries, wider extractor.
  # T5 with 4 heads of 16 (not 2 of 32): the grounding loss claims head 0, the others keep the text.
  # SAM's embedding / prompt width 64 (tiny: 32) with the mask-detail branch: together they lift the
  # referring-mask gIoU given the true box from 0.58 to 0.75 (neither alone does); location head 128 wide.
  # Object boxes: the refiner on a 16×16 crop and the 3×3 pointer window at evaluation took the held-out
  # referring Acc@0.5 of one checkpoint from 0.66 to 0.76 (refiner) and 0.84 (both).
  c.model.tiny = ml_collections.ConfigDict({
      "sam": {"patch_size": 8, "window_size": 4, "out_channels": 64},
      "prompt": {"grid_size": 8, "prompt_dim": 64},
      "eva": {"patch_size": 8, "image_size": image_size, "rope_ref_grid": 8},
      "t5": {"num_heads": 4, "head_dim": 16},
      "num_queries": 16, "extractor_width": 64, "query_hidden": 64, "spatial_tokens": 8,
      "pointer_head": True, "loc_hidden": 128, "refseg_train_box": "target",
      "seg_box_prompt": "target", "train_box_noise": 0.1, "mask_detail": 8, "box_refine": 16,
      "pointer_window": 1})
  # No pretrained tiny weights exist, so nothing is frozen here (the full configs freeze SAM and T5).
  c.trainable = (".",)
  c.weights = ml_collections.ConfigDict({"sam": "", "eva": "", "t5": ""})
  c.tokenizer = "tiny"
  c.optimizer = recipes.optimizer_config(lr=2e-3, steps=1500, warmup=50, batch_size=32,
                                         weight_decay=0.01)
  # Point L1 is in pixels: 0.1 (SPEC, 384 px) × 384 / 64 keeps its weight relative to the text loss.
  c.loss = ml_collections.ConfigDict({"label_smoothing": 0.0, "point_weight": 0.6,
                                      "attention_grounding_weight": 1.0, "box_refine_weight": 0.6})
  c.tasks = ml_collections.ConfigDict({
      "ln": {"dataset": "localized_narratives/grounded_shapes", "weight": 1.5},
      "caption": {"dataset": "coco_captions/grounded_shapes", "weight": 1.5},
      "referring": {"dataset": "refcoco/grounded_shapes", "weight": 4.0},
      "region_caption": {"dataset": "refcoco/grounded_shapes", "weight": 0.5},
      # Dense captioning costs ~2.8× a caption step (4 regions through the extractor and T5).
      "dense_caption": {"dataset": "coco_panoptic/grounded_shapes", "weight": 0.25},
      "reason_seg": {"dataset": "reasonseg/grounded_shapes", "weight": 2.5}})
  c.data = ml_collections.ConfigDict({
      "image_size": image_size, "scale_range": (0.8, 1.2), "max_target_len": 40, "max_prompt_len": 12,
      "max_seg": 1, "max_regions": 4, "max_region_len": 6, "seg_boxes": True, "mixing": "batch",
      # One Grain worker process converts batches beside the step (in-process: 7% data wait, 2.5 steps/s;
      # with it 2%, 3.0 steps/s on 2 cores); the batches are the same either way.
      "num_workers": 1, "num_shards": 0, "tfds_dir": "",
      "grounded_shapes": {"num_train": 2000, "num_validation": 200, "seed": 0, "size": 64,
                          "max_shapes": 3, "scale": 2.0, "colours": 4}})
  c.eval = ml_collections.ConfigDict({"tasks": ("ln", "caption", "referring", "reason_seg"),
                                      "batch_size": 50, "max_examples": 200, "max_decode_len": 40})
  c.eval_every = 1500  # at the end only: each evaluation decodes every eval task (~45 s here)
  c.log_every = 50
  c.checkpoint_every = 400
  c.visualize = ml_collections.ConfigDict({"enabled": True, "num_images": 3})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  return c
