"""The data layer: datasets on disk (CoOp catalog, imagefolders, Hub, toy tasks), few-shot sampling, image decoding,
augmentation and the loaders that yield `{"pixel_values", "labels"}` batches. Imports nothing above it."""
