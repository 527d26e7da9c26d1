"""A small, really pre-trained CLIP and few-shot tasks on synthetic images: the embedded default."""
