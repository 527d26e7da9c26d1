"""`pipeline("dpt-image-classification", model=...)`: a transformers `Pipeline` classifying images with a DPT adapter.

transformers' `"zero-shot-image-classification"` pipeline writes each label into `hypothesis_template` and hands CLIP
the token ids; a DPT adapter replaces the template by its learned context and classifies through
`DPTPeftModel.forward`, so it needs its own pipeline. This one takes the same call arguments and returns the same
structure (`[{"score", "label"}, ...]`, best first, softmax over the label space), with transformers' batching
(`batch_size=`), devices and dtypes.

`candidate_labels` classify over other classes for one call only: their class features are computed from the
adapter's learned prompts without touching its label space, config or weights (unlike `set_class_names`, which
switches the label space for good and re-initializes the auxiliary class-aware classifier).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from huggingface_hub.utils import httpx  # the HTTP client transformers' load_image uses
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY

from ..class_names import display_names
from ..data.images import UNREADABLE_IMAGE_ERRORS, open_rgb
from ..lora_classifier import LoraClassifier
from ..peft_model import DPTPeftModel
from ..training.ensemble import checked_weight, zero_shot_ensemble_for_call
from ..utils.errors import DownloadError, DownloadTimeout, InputTypeError, MissingInputError, UserInputError
from .auto import AutoDPTModel
from .inference import image_processor_for

logger = logging.getLogger(__name__)
TASK = "dpt-image-classification"
# An unreachable host, a trickling server or a huge body should fail, not hang or fill memory.
DEFAULT_URL_TIMEOUT = 10.0  # seconds per network read
DEFAULT_URL_DEADLINE = 60.0  # seconds for a whole download: a server trickling bytes cannot hold a call longer
DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 2**20  # an image body larger than this is refused before it fills memory
IGNORED_PIPELINE_ARGUMENTS = {"local_files_only"}  # left in the kwargs by transformers' pipeline() factory


class DPTImageClassificationPipeline(Pipeline):
    """Classifies images over a DPT adapter's classes, or over `candidate_labels` for one call.

    Build it with `pipeline("dpt-image-classification", model=...)` (after `import dpt_peft`), where `model` is a
    `DPTPeftModel`, an adapter directory or a Hub repo id (loaded with [`AutoDPTModel`]). An adapter whose base model
    is the toy CLIP (`dpt-peft/toy-clip`, not a Hub repo) must be passed loaded: `transformers.pipeline()` reads the
    base model's config itself before calling the loader, so pass `model=AutoDPTModel.from_pretrained(adapter_dir)`.

    Call arguments:
        images: a PIL image, a path, an http(s) URL (`timeout=` seconds per read, default 10; `download_deadline=`
            seconds in all, default 60; `max_download_bytes=`, default 64 MiB), a preprocessed tensor `[3, H, W]`, or
            a list of these (then a list of results comes back).
        top_k: keep the `top_k` best labels (default: all).
        candidate_labels: classify over these names for this call only (the adapter's learned context is applied to
            them); the adapter's own classes, config and weights are unchanged.
        task: the task of a multitask adapter (its label space); ignored with `candidate_labels`.
        zero_shot_ensemble: for this call, the weight of the adapter's probabilities, the rest the frozen zero-shot
            classifier's (e.g. 0.5; default: the adapter's own setting); the adapter's config is unchanged.
        hypothesis_template: accepted for compatibility with `"zero-shot-image-classification"` and ignored: the
            adapter's learned context replaces it.

    Example:

        ```py
        >>> import dpt_peft
        >>> from transformers import pipeline
        >>> classifier = pipeline("dpt-image-classification", model="someone/dpt-clip-adapter", device="cpu")
        >>> classifier("cat.jpg", top_k=2)
        [{'score': 0.91, 'label': 'cat'}, {'score': 0.05, 'label': 'dog'}]
        >>> classifier(["cat.jpg", "https://example.com/dog.png"], candidate_labels=["cat", "dog", "fox"], batch_size=8)
        ```
    """

    _load_processor = False
    _load_image_processor = None  # the base model's, when pipeline() finds it; else looked up from the model
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False  # the adapter holds the tokenizer its class prompts were built with

    def __init__(self, model: DPTPeftModel, image_processor: Any = None, **kwargs: Any) -> None:
        if not isinstance(model, (DPTPeftModel, LoraClassifier)):
            raise InputTypeError(
                f"The {TASK!r} pipeline needs a DPT or dpt-peft LoRA adapter: a DPTPeftModel (get_peft_model, "
                "PeftModel.from_pretrained or AutoDPTModel.from_pretrained), a LoraClassifier, an adapter directory or "
                f"a Hub repo id; got {type(model).__name__}."
            )
        self._template_noted = False
        if image_processor is None:
            try:
                image_processor = image_processor_for(model)
            except ValueError as err:
                raise UserInputError(f"{err} For the pipeline: pipeline(..., image_processor=...).") from err
        super().__init__(model=model, image_processor=image_processor, **kwargs)
        self.model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """The adapter (with its model card) and the image processor, loadable with
        `pipeline("dpt-image-classification", model=AutoDPTModel.from_pretrained(save_directory))`.

        No custom code is copied, unlike transformers' saver for registered pipelines (which cannot follow this
        package's relative imports): `import dpt_peft` registers the pipeline, as it registers DPT with PEFT.
        """
        if os.path.isfile(save_directory):
            raise UserInputError(f"{save_directory} is a file; save_pretrained writes into a directory.")
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(save_directory)

    # ------------------------------------------------------------------ parameters
    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        candidate_labels: list[str] | None = None,
        task: str | None = None,
        hypothesis_template: str | None = None,
        timeout: float | None = None,
        download_deadline: float | None = None,
        max_download_bytes: int | None = None,
        zero_shot_ensemble: float | None = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        unexpected = sorted(set(kwargs) - IGNORED_PIPELINE_ARGUMENTS)
        if unexpected:
            raise InputTypeError(
                f"Unexpected argument(s) {unexpected} for the {TASK!r} pipeline; it takes top_k, candidate_labels, "
                "task, hypothesis_template, timeout, download_deadline, max_download_bytes and zero_shot_ensemble."
            )
        preprocess, forward, postprocess = {}, {}, {}
        for name, value in (
            ("timeout", timeout),
            ("download_deadline", download_deadline),
            ("max_download_bytes", max_download_bytes),
        ):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise UserInputError(f"{name}={value!r} must be a positive number.")
                preprocess[name] = value
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise UserInputError(f"top_k={top_k!r} must be a positive whole number.")
            postprocess["top_k"] = top_k
        if candidate_labels is not None:
            forward["candidate_labels"] = postprocess["candidate_labels"] = _checked_candidates(candidate_labels)
        if task is not None:
            forward["task"] = postprocess["task"] = task
        if zero_shot_ensemble is not None:
            forward["zero_shot_ensemble"] = checked_weight(zero_shot_ensemble)
        if hypothesis_template is not None and not self._template_noted:
            logger.warning(
                "hypothesis_template is ignored: a DPT adapter puts each label into its learned context instead."
            )
            self._template_noted = True
        return preprocess, forward, postprocess

    # ------------------------------------------------------------------ the three steps
    def preprocess(
        self,
        image: Any,
        timeout: float | None = None,
        download_deadline: float | None = None,
        max_download_bytes: int | None = None,
    ) -> dict[str, torch.Tensor]:
        if isinstance(image, torch.Tensor):
            return {"pixel_values": _one_image_tensor(image)}
        picture = read_image(image, timeout, download_deadline, max_download_bytes)
        pixels = self.image_processor(images=[picture], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels}

    def _forward(
        self,
        model_inputs: dict[str, torch.Tensor],
        candidate_labels: tuple[str, ...] | None = None,
        task: str | None = None,
        zero_shot_ensemble: float | None = None,
    ) -> dict[str, torch.Tensor]:
        with zero_shot_ensemble_for_call(self.model, zero_shot_ensemble):
            return self._logits(model_inputs, candidate_labels, task)

    def _logits(
        self, model_inputs: dict[str, torch.Tensor], candidate_labels: tuple[str, ...] | None, task: str | None
    ) -> dict[str, torch.Tensor]:
        pixel_values = model_inputs["pixel_values"].to(self._pixel_dtype())
        if candidate_labels is None or list(candidate_labels) == self._own_class_names(task):
            logits = self.model(pixel_values=pixel_values, task=task).logits
        else:
            try:
                self.model.label_space_for(list(candidate_labels))  # checked, named as the caller knows it
            except ValueError as err:
                raise UserInputError(f"candidate_labels: {err}") from err
            logits = self.model(pixel_values=pixel_values, class_names=list(candidate_labels)).logits
        return {"logits": logits}

    def postprocess(
        self,
        model_outputs: dict[str, torch.Tensor],
        top_k: int | None = None,
        candidate_labels: tuple[str, ...] | None = None,
        task: str | None = None,
    ) -> list[dict[str, Any]]:
        names = list(candidate_labels) if candidate_labels is not None else self.model.class_names(task)
        probabilities = model_outputs["logits"][0].float().softmax(dim=-1)
        scores, indices = probabilities.topk(len(names) if top_k is None else min(top_k, len(names)))
        return [{"score": score, "label": names[i]} for score, i in zip(scores.tolist(), indices.tolist())]

    # ------------------------------------------------------------------ helpers
    def _own_class_names(self, task: str | None) -> list[str] | None:
        try:
            return self.model.class_names(task)
        except ValueError:  # a multitask adapter and no task: candidates are their own label space
            return None

    def _pixel_dtype(self) -> torch.dtype:
        return self.model.get_base_model().vision_model.embeddings.patch_embedding.weight.dtype


class DPTZeroShotPipeline(DPTImageClassificationPipeline):
    """Former name of [`DPTImageClassificationPipeline`], kept for compatibility: `DPTZeroShotPipeline(model)` runs
    where the model is (it does not move it) and, since 0.3, `candidate_labels` no longer change the adapter."""

    def __init__(self, model: DPTPeftModel, image_processor: Any = None, **kwargs: Any) -> None:
        if isinstance(model, torch.nn.Module):
            kwargs.setdefault("device", next(model.parameters()).device)
        super().__init__(model=model, image_processor=image_processor, **kwargs)


def register_pipeline() -> None:
    """Make `transformers.pipeline("dpt-image-classification", ...)` build a [`DPTImageClassificationPipeline`]."""
    registered = PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl")
    if registered is not DPTImageClassificationPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=DPTImageClassificationPipeline, pt_model=AutoDPTModel, type="image"
        )


# ---------------------------------------------------------------------- inputs
def read_image(
    source: Any,
    timeout: float | None = None,
    deadline: float | None = None,
    max_bytes: int | None = None,
) -> Image.Image:
    """An RGB image from a PIL image, encoded bytes, a path, an http(s) URL or a `data:image/...` URI. A URL is read
    with `timeout` seconds per read, `deadline` seconds in all and at most `max_bytes` (defaults above)."""
    if isinstance(source, (Image.Image, bytes)):
        return open_rgb(source)
    if not isinstance(source, (str, os.PathLike)):
        raise InputTypeError(
            f"Cannot read an image from {type(source).__name__}; pass a PIL image, a path, an http(s) URL or a "
            "preprocessed tensor [3, H, W]."
        )
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        return _download_image(
            text,
            DEFAULT_URL_TIMEOUT if timeout is None else timeout,
            DEFAULT_URL_DEADLINE if deadline is None else deadline,
            DEFAULT_MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes,
        )
    if os.path.isfile(text):
        try:
            return open_rgb(text)
        except UNREADABLE_IMAGE_ERRORS as err:
            raise UserInputError(f"{text} is not a readable image ({err}).") from err
    if text.startswith("data:image/"):
        return open_rgb(load_image(text))
    raise MissingInputError(f"{text} is not an image file, an http(s) URL or a data:image URI.")


def _download_image(url: str, timeout: float, deadline: float, max_bytes: int) -> Image.Image:
    """The image at `url`, streamed: refused past `max_bytes` or `deadline` seconds, decoded by the project's
    decoder (as for paths)."""
    start, size, chunks = time.monotonic(), 0, []
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise UserInputError(
                        f"{url} sent more than {max_bytes} bytes, the download cap; pass max_download_bytes= to "
                        "allow more, or download the image yourself."
                    )
                if time.monotonic() - start > deadline:
                    raise DownloadTimeout(
                        f"Downloading {url} took over {deadline:g} s (the download deadline; {size} bytes so far); "
                        "pass download_deadline= to wait longer, or check the server."
                    )
                chunks.append(chunk)
    except httpx.HTTPError as err:
        raise DownloadError(
            f"Could not download the image {url} ({type(err).__name__}: {err}). Check the URL and the network "
            "connection (offline?), or pass a local path or a PIL image."
        ) from err
    try:
        return open_rgb(b"".join(chunks))
    except UNREADABLE_IMAGE_ERRORS as err:
        raise UserInputError(f"{url} did not return a readable image ({err}).") from err


def _one_image_tensor(pixels: torch.Tensor) -> torch.Tensor:
    if pixels.dim() == 3:
        return pixels.unsqueeze(0)
    if pixels.dim() == 4 and pixels.shape[0] == 1:
        return pixels
    raise UserInputError(
        f"A tensor input is one preprocessed image [3, H, W]; got shape {tuple(pixels.shape)}. Pass several images "
        "as a list."
    )


def _checked_candidates(candidate_labels: Any) -> tuple[str, ...]:
    if isinstance(candidate_labels, str) or not isinstance(candidate_labels, (list, tuple)):
        raise InputTypeError(
            f"candidate_labels must be a list of class names, got {type(candidate_labels).__name__} "
            f"({candidate_labels!r}); e.g. candidate_labels=['cat', 'dog']."
        )
    if not candidate_labels:
        raise UserInputError("candidate_labels is empty; give at least one class name.")
    shown = display_names(list(candidate_labels))
    repeated = [name for name, display in zip(candidate_labels, shown) if name != display]
    if repeated:  # the answer is a score per label: a repeated label could not be told apart in it
        raise UserInputError(
            f"candidate_labels: duplicate class names {repeated[:5]} (the same prompt, so the same score); give "
            "each candidate once."
        )
    return tuple(candidate_labels)
