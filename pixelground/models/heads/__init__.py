"""PixelLLM's heads on the language model's states and the image features, one module each:
location (per-token points / pointer), seg_projection (LISA `[SEG]` → SAM prompt), mask_adapter
(referring-segmentation box tokens), mask_detail (high-resolution branch of the mask decoder),
box_refiner (second look at object boxes), proposals (dense-captioning region proposals)."""
