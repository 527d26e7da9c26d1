"""The Hugging Face stack around the tuner: `Trainer`, the pipeline, the Auto class, prediction and inspection."""
