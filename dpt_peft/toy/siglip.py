"""The toy SigLIP: the toy CLIP's world (`shapes.py`) learned by SigLIP's towers, shipped like the toy CLIP.

The weights ship in `siglip_assets/` (id `dpt-peft/toy-siglip`); `python -m dpt_peft.toy.siglip --output_dir DIR`
rebuilds them deterministically (900 steps of 256 pairs, then the sigmoid head: about 7 minutes on 2 CPU cores).
The tokenizer is a real `tokenizers` model saved as tokenizer.json, framed as SiglipTokenizer frames text (no start
token, `</s>` after, padded with `</s>` to the context), so it loads offline with AutoTokenizer and without
`sentencepiece`.

Why two stages. Trained from scratch with the sigmoid loss alone, at this scale (hundreds of steps of 128-256
pairs, where SigLIP trains for tens of thousands of steps of 32k), the towers learn colour and size but not shape
or position: every pair starts far below SigLIP's bias (`t = 10`, `b = -10`), so early training only pulls
positives together, the embeddings fall into a narrow cone, and a temperature that hardly moves cannot separate
them. Measured on the shifted test images, a nearest-class-mean probe of the image features read shape at 40% and
position at 21% (chance: 17%, 20%) after sigmoid training, against 74% and 50% after the same 500 steps of
softmax training. So the towers learn with the toy CLIP's softmax loss, and SigLIP's own head (`logit_scale`,
`logit_bias`) is then fitted with the sigmoid loss on the frozen towers: the logits are calibrated pairwise
probabilities, as a SigLIP's are, and the class ranking is the towers'.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel

from .pretrain import (
    TOY_TEXT_CONTEXT,
    TOY_TEXT_TOWER,
    TOY_VISION_TOWER,
    contrastive_loss,
    pretraining_main,
    save_toy,
    train_on_shapes,
)
from .shapes import IMAGE_SIZE, VOCABULARY, captions, render

SIGLIP_ASSETS = Path(__file__).parent / "siglip_assets"
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
TEXT_CONTEXT = TOY_TEXT_CONTEXT  # SigLIP's is 64; the toy's captions and prompts are short
PAD, END, UNKNOWN = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as in SigLIP's SentencePiece vocabulary


def build_siglip_tokenizer(words: list[str], pad_token: str = END) -> PreTrainedTokenizerFast:
    """Lower-casing BPE tokenizer whose vocabulary is ASCII characters plus `words` as whole tokens; `</s>` ends every
    text and `pad_token` (SigLIP's `</s>` by default) pads it. Punctuation splits off, so "cat." is "cat" + "." and
    a prompt tokenizes as the concatenation of its parts (exact CoOp layouts)."""
    bpe = Tokenizer(models.BPE(unk_token=UNKNOWN))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=sorted(set(string.ascii_lowercase + string.digits + string.punctuation)),
        special_tokens=[PAD, END, UNKNOWN],
    )
    bpe.train_from_iterator(list(dict.fromkeys(w.lower() for w in words)), trainer=trainer)
    end_id = bpe.token_to_id(END)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"$A {END}", pair=f"$A {END} $B {END}", special_tokens=[(END, end_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=END, pad_token=pad_token, unk_token=UNKNOWN, model_max_length=TEXT_CONTEXT
    )


def toy_siglip_config(tokenizer: PreTrainedTokenizerFast) -> SiglipConfig:
    """The toy CLIP's widths and depths (vision 32 px, patch 8, width 64, 4 layers; text width 64, 3 layers) with
    SigLIP's towers: no CLS, an attention-pooling head, a bidirectional text tower pooled at its last position."""
    return SiglipConfig(
        text_config=dict(
            **TOY_TEXT_TOWER,
            vocab_size=len(tokenizer),
            max_position_embeddings=TEXT_CONTEXT,
            projection_size=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=TOY_VISION_TOWER,
    )


def siglip_image_processor():
    """SigLIP's preprocessing of the 32 px toy images (resize to 32 x 32, mean and std 0.5), written as a CLIP image
    processor (resize the short side, centre crop: the same on square images) because that is the processor the
    training CLI reads its crop size from."""
    from transformers import CLIPImageProcessor  # imported here: without torchvision it logs a fallback notice

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,  # bilinear, as SiglipImageProcessor
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
    )


def to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalized float [B, 3, H, W], as `siglip_image_processor` gives."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - torch.tensor(SIGLIP_MEAN)[:, None, None]) / torch.tensor(SIGLIP_STD)[:, None, None]


def pair_signs(texts: list[str]) -> torch.Tensor:
    """+1 for pairs with identical captions (positives), -1 for the others."""
    return 2 * torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32) - 1


def sigmoid_loss(logits: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, summed over pairs and averaged over images."""
    return -F.logsigmoid(signs * logits).sum(dim=1).mean()


def fit_sigmoid_head(
    model: SiglipModel, tokenize: Callable, rng: np.random.Generator, batches: int, batch_size: int, steps: int = 500
) -> None:
    """Fit `logit_scale` and `logit_bias` with the sigmoid loss on frozen towers: only two scalars learn, so the
    features of `batches` fresh batches are computed once, and full-batch Adam (lr 0.05) runs to convergence."""
    pairs = []
    with torch.no_grad():
        for _ in range(batches):
            batch = render(rng, batch_size)
            texts = captions(batch, rng)
            images = model.get_image_features(pixel_values=to_pixel_values(batch.images)).pooler_output
            words = model.get_text_features(**tokenize(texts)).pooler_output
            pairs.append((F.normalize(images) @ F.normalize(words).t(), pair_signs(texts)))
    optimizer = torch.optim.Adam([model.logit_scale, model.logit_bias], lr=0.05)
    for _ in range(steps):
        scale, bias = model.logit_scale.exp(), model.logit_bias
        loss = torch.stack([sigmoid_loss(cosines * scale + bias, signs) for cosines, signs in pairs]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scale, bias = model.logit_scale.exp().item(), model.logit_bias.item()
    print(f"sigmoid head: loss {loss.item():.3f}  t {scale:.1f}  b {bias:.1f}", flush=True)


def pretrain_siglip(
    output_dir: str | os.PathLike, steps: int = 900, batch_size: int = 256, seed: int = 0, head_batches: int = 8
) -> Path:
    """Pre-train the toy SigLIP (the toy CLIP's recipe and softmax loss for the towers, then SigLIP's head fitted with
    the sigmoid loss from its `t = 10`, `b = -10` start; see the module docstring) and save model, tokenizer and
    image processor to `output_dir`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = build_siglip_tokenizer(VOCABULARY)
    model = SiglipModel(toy_siglip_config(tokenizer))

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:  # max-length padding, no mask: as SigLIP trains
        ids = tokenizer(texts, padding="max_length", max_length=TEXT_CONTEXT, return_tensors="pt")["input_ids"]
        return {"input_ids": ids}

    with torch.no_grad():  # the softmax loss ignores the bias; the temperature starts as CLIP's
        model.logit_scale.fill_(math.log(1 / 0.07))
    train_on_shapes(model, tokenize, to_pixel_values, contrastive_loss, rng, steps, batch_size)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    fit_sigmoid_head(model, tokenize, rng, head_batches, batch_size)
    return save_toy(output_dir, model, tokenizer, siglip_image_processor())


def main() -> None:
    pretraining_main(pretrain_siglip, "SigLIP", SIGLIP_ASSETS, steps=900, batch_size=256)


if __name__ == "__main__":
    main()
