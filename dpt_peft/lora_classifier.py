"""`LoraClassifier`: a CLIP (or SigLIP) with PEFT's own LoRA, classifying images as CLIP-LoRA does (`--method lora`).

The classifier is the text features of one template per class ("a photo of a {}."), computed by the LoRA'd text
encoder: recomputed every training step, so the text LoRA learns through them (CLIP-LoRA's `run_lora`), and cached at
inference while the text tower's weights, the classes, device, dtype and autocast are unchanged. Logits are
`logit_scale` (100) times the cosine of the LoRA'd image features with them.

It is a `PeftModel`, so PEFT's save, `set_peft_model_state_dict`, `merge_and_unload` and `disable_adapter` work
unchanged, and it offers what the training loop, checkpoints, reports and `evaluate_split` ask of a `DPTPeftModel`
(`forward(pixel_values, labels, ...)` -> `DPTOutput`, `zero_shot_image_features`, `class_names`, `set_class_names`,
`adapter_parameters`, `save_pretrained(model_card_info=...)`). The adapter it saves is a plain PEFT LoRA adapter;
`classifier_config.json` beside it records the classes, template and base model (`lora_adapter.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .adapter_files import AdapterFileError
from .backbones import Backbone, backbone_for
from .class_names import DEFAULT_TASK
from .class_prompts import build_template_ids
from .layer import ParameterKind
from .lora_adapter import CLASSIFIER_CONFIG_FILE, LoraClassifierConfig, lora_model_card
from .outputs import DPTOutput
from .utils.durable import plain_file_mode
from .utils.errors import InputTypeError, UserInputError
from .utils.stamped_cache import StampedCache
from .utils.write_policy import atomic_write_bytes

IGNORED_FORWARD_ARGUMENTS = {"return_dict", "return_loss"}  # passed by generic training loops (Trainer)
HUB_KWARGS = ("token", "cache_dir", "local_files_only", "force_download", "proxies")


class LoraClassifier(PeftModel):
    """A base dual encoder with a LoRA adapter and the frozen-template classifier of CLIP-LoRA.

    Make one with `LoraClassifier(base, clip_lora_config(base), classifier=LoraClassifierConfig(class_names=[...]),
    tokenizer=...)`, or load a saved one with `LoraClassifier.from_pretrained(base, folder, tokenizer=...)` (or
    `AutoDPTModel.from_pretrained(folder)`, which finds the base model and tokenizer itself).
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config,
        adapter_name: str = "default",
        classifier: LoraClassifierConfig | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ) -> None:
        with warnings.catch_warnings():  # PEFT asks transformers for a name it deprecated; nothing for a user to do
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            super().__init__(model, peft_config, adapter_name, **kwargs)
        self.lora_backbone: Backbone = backbone_for(model)
        self.classifier: LoraClassifierConfig | None = None
        self.lora_tokenizer: PreTrainedTokenizerBase | None = None
        self._features = StampedCache()  # class features, by (kind, classes)
        if classifier is not None:
            self.attach_classifier(classifier, tokenizer)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config=None,
        *,
        classifier: LoraClassifierConfig | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ) -> LoraClassifier:
        """A saved LoRA adapter and its `classifier_config.json` on `model`, with PEFT's `from_pretrained`. The base
        model's family and shape are checked against the recorded ones before the weights load; NaN or infinite
        weights are refused. `tokenizer`: the base model's (default: `AutoTokenizer` from its `name_or_path`)."""
        where = f"The LoRA adapter in {str(model_id)!r}"
        if classifier is None:
            hub = {name: kwargs[name] for name in HUB_KWARGS if name in kwargs}
            classifier = LoraClassifierConfig.from_pretrained(
                model_id, kwargs.get("subfolder"), kwargs.get("revision"), **hub
            )
            if classifier is None:
                raise AdapterFileError(
                    f"{str(model_id)!r} holds no LoRA adapter of dpt_peft (see its adapter_config.json)."
                )
        classifier.check_base(backbone_for(model), where)
        loaded = super().from_pretrained(
            model, model_id, adapter_name, is_trainable, config or classifier.peft_config, **kwargs
        )
        if not isinstance(loaded, cls):
            raise AdapterFileError(
                f"{where} has task_type {loaded.peft_config[adapter_name].task_type}; save it again."
            )
        for key, (_, parameter) in loaded.adapter_parameters(adapter_name).items():
            if not bool(torch.isfinite(parameter).all()):
                raise UserInputError(
                    f"{where} holds NaN or infinite values in {key}, so it cannot classify: it comes from a diverged "
                    "training run or a damaged file; use an earlier checkpoint's adapter."
                )
        loaded.attach_classifier(classifier, tokenizer)
        return loaded

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args: Any, **kwargs: Any):
        """PEFT's `load_adapter`, refusing a file that does not fill every LoRA matrix of the config (PEFT only
        warns) or holds tensors the config has no place for."""
        result = super().load_adapter(model_id, adapter_name, *args, **kwargs)
        missing = [key for key in result.missing_keys if ".lora_" in key and f".{adapter_name}." in key]
        if missing or result.unexpected_keys:
            raise UserInputError(
                f"The LoRA adapter in {str(model_id)!r} does not match its config: missing {missing[:3]}, unexpected "
                f"{list(result.unexpected_keys)[:3]}. Save the adapter again with save_pretrained."
            )
        return result

    def attach_classifier(
        self, classifier: LoraClassifierConfig, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        """Classify over `classifier`'s classes, recording the base model it applies to when it records none."""
        base = self.get_base_model()
        classifier.check_base(self.lora_backbone)
        if classifier.base_model_family is None:
            classifier = classifier.recorded_from(base)
        if tokenizer is None:
            source = getattr(base, "name_or_path", None) or classifier.base_model_name_or_path
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError, TypeError) as err:
                raise UserInputError(
                    f"Could not load the tokenizer of {source!r} ({err}); pass tokenizer= (the base model's)."
                ) from err
        self.lora_tokenizer = tokenizer
        self.template_ids(classifier.class_names, classifier.template)  # every name checked before it is kept
        self.classifier = classifier
        self._features.forget()

    # ------------------------------------------------------------------ the forward
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task: str | None = None,
        guidance: bool = False,
        output_zero_shot_logits: bool = False,
        output_attentions: bool = False,
        class_names: list[str] | None = None,
        zero_shot_image_features: torch.Tensor | None = None,
        output_text_embeds: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> DPTOutput:
        """Logits `[B, C]` over the classes (or `class_names`, for this call only), the cross-entropy loss with
        `labels`, and the frozen model's logits with `output_zero_shot_logits` (from `zero_shot_image_features`
        when given). Under `with model.disable_adapter():` this is the base model's own forward."""
        if not self.has_active_enabled_adapter:
            return self.get_base_model()(pixel_values=pixel_values, **kwargs)
        unexpected = sorted(k for k, v in kwargs.items() if v is not None and k not in IGNORED_FORWARD_ARGUMENTS)
        if unexpected:
            raise InputTypeError(
                f"Unexpected argument(s) {unexpected}; a LoRA classifier's forward takes pixel_values, labels, task, "
                "output_zero_shot_logits, class_names, zero_shot_image_features and output_text_embeds."
            )
        if pixel_values is None:
            raise UserInputError("pixel_values is required: model(pixel_values=..., labels=...).")
        if guidance or output_attentions:
            raise UserInputError(
                f"{'guidance' if guidance else 'output_attentions'}=True is DPT's (a guidance loss / class-aware "
                "attention); a LoRA classifier trains with plain cross-entropy, as CLIP-LoRA."
            )
        self.class_names(task)  # the task checked
        texts = self.class_text_features(class_names)
        images = self.lora_backbone.image_features(pixel_values)
        logits = self.scaled_cosine(images, texts)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device).long(), reduction="mean")
            if num_items_in_batch is not None:  # transformers' Trainer under gradient accumulation
                loss = loss * len(pixel_values) / num_items_in_batch
        zero_shot_logits = None
        if output_zero_shot_logits:
            frozen = zero_shot_image_features
            frozen = self.zero_shot_image_features(pixel_values) if frozen is None else frozen.to(images.device)
            zero_shot_logits = self.scaled_cosine(frozen, self.zero_shot_text_features(class_names))
        return DPTOutput(
            loss=loss,
            logits=logits,
            zero_shot_logits=zero_shot_logits,
            image_embeds=images,
            text_embeds=texts if output_text_embeds else None,
        )

    def scaled_cosine(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """`logit_scale` x the cosine of image and class features (CLIP-LoRA's `logit_scale * image @ text.t()`)."""
        images = images / images.norm(dim=-1, keepdim=True)
        texts = texts / texts.norm(dim=-1, keepdim=True)
        return self.classifier.logit_scale * images @ texts.t().to(images.dtype)

    # ------------------------------------------------------------------ class and image features
    def template_ids(self, class_names: list[str], template: str | None = None) -> torch.Tensor:
        """Token ids `[C, T]` of `template` filled with each class name, framed and padded as the family's."""
        backbone, tokenizer = self.lora_backbone, self.lora_tokenizer
        prompt_format = backbone.prompt_format(tokenizer)
        length = backbone.text_context_length
        pad_to = length if prompt_format.pad_to_context else None
        template = template or self.classifier.template
        return build_template_ids(tokenizer, prompt_format, list(class_names), template, length, pad_to=pad_to)

    def class_text_features(self, class_names: list[str] | None = None) -> torch.Tensor:
        """Features `[C, P]` of the classes' prompts through the LoRA'd text encoder (un-normalized): fresh while
        the text LoRA trains (gradient on, or dropout active), else cached."""
        names = tuple(class_names or self.classifier.class_names)
        text_lora = [p for name, p in self.lora_backbone.text_layers.named_parameters() if "lora_" in name]
        training_text = self.training and self.active_peft_config.lora_dropout > 0
        if text_lora and (training_text or (torch.is_grad_enabled() and any(p.requires_grad for p in text_lora))):
            return self._encode(names)
        return self._cached(("learned", names), lambda: self._encode(names))

    def zero_shot_text_features(self, class_names: list[str] | None = None) -> torch.Tensor:
        """Features `[C, P]` of the same prompts through the frozen base model (the zero-shot classifier)."""
        names = tuple(class_names or self.classifier.class_names)

        def compute() -> torch.Tensor:
            with self.disable_adapter():
                return self._encode(names)

        with torch.no_grad():
            return self._cached(("zero_shot", names), compute)

    def zero_shot_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features `[B, P]` of the frozen base model (what `forward(zero_shot_image_features=...)` takes)."""
        with torch.no_grad(), self.disable_adapter():
            return self.lora_backbone.image_features(pixel_values)

    def _encode(self, names: tuple[str, ...]) -> torch.Tensor:
        ids = self.template_ids(list(names)).to(self.lora_backbone.text_parameter.device)
        return self.lora_backbone.text_features(ids)

    def _cached(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`compute()`, kept while no gradient is needed and the text tower's weights (LoRA matrices, a merge),
        the template, device, dtype and autocast are what they were."""
        return self._features.get(key, self._text_stamp, compute)

    def _text_stamp(self) -> tuple:
        weight = self.lora_backbone.text_parameter
        layers = self.lora_backbone.text_layers
        return (
            self.classifier.template,
            self.active_adapter,
            weight.device,
            weight.dtype,
            torch.is_autocast_enabled(weight.device.type),
            tuple((p._version, p.data_ptr()) for p in layers.parameters()),
            tuple(getattr(m, "disable_adapters", False) for m in layers.modules() if hasattr(m, "lora_A")),
        )

    # ------------------------------------------------------------------ the tools' seam (as DPTPeftModel's)
    @property
    def backbone(self) -> Backbone:
        return self.lora_backbone

    def adapter_parameters(self, adapter_name: str | None = None) -> dict[str, tuple[ParameterKind, nn.Parameter]]:
        """Every LoRA matrix of an adapter (default: the active one): key as saved -> (kind, parameter)."""
        adapter = adapter_name or self.active_adapter
        marker = f".{adapter}."
        return {
            name.replace(marker, "."): (ParameterKind.LORA, parameter)
            for name, parameter in self.named_parameters()
            if ".lora_" in name and marker in name
        }

    def class_names(self, task: str | None = None, adapter_name: str | None = None) -> list[str]:
        """The classes, in label order (one task: `task` may be None or "default")."""
        if self.classifier is None:
            raise UserInputError(
                "This LoraClassifier has no classes yet: call attach_classifier(LoraClassifierConfig(...))."
            )
        if task not in (None, DEFAULT_TASK):
            raise UserInputError(f"Unknown task {task!r}; a LoRA classifier has one task, {DEFAULT_TASK!r}.")
        return list(self.classifier.class_names)

    def label_space_for(self, class_names: list[str], adapter_name: str | None = None) -> torch.Tensor:
        """The prompts' token ids `forward(class_names=...)` would use; raises ValueError for names it cannot use."""
        return self.template_ids(class_names)

    def set_class_names(
        self,
        class_names: list[str],
        adapter_name: str | None = None,
        zero_shot_template: str | None = None,
    ) -> None:
        """Classify over other classes (and, with `zero_shot_template`, another template) for good; the LoRA
        matrices stay (the text encoder reads any class name)."""
        changed = dataclasses.replace(
            self.classifier, class_names=class_names, template=zero_shot_template or self.classifier.template
        )
        changed.peft_config = self.classifier.peft_config
        self.template_ids(changed.class_names, changed.template)
        self.classifier = changed
        self._features.forget()

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        model_card_info: Any = None,
        **kwargs: Any,
    ) -> None:
        """PEFT's save (a plain LoRA adapter, safetensors only; NaN or infinite matrices refused), then
        `classifier_config.json` beside each adapter and a model card."""
        if not safe_serialization:
            raise UserInputError("safe_serialization=False would write a pickle, which dpt_peft never loads; drop it.")
        names = [name for name in selected_adapters or list(self.peft_config) if name in self.peft_config]
        for name in names:
            for key, tensor in get_peft_model_state_dict(self, adapter_name=name, save_embedding_layers=False).items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise UserInputError(
                        f"Refusing to save adapter {name!r}: {key} holds NaN or infinite values (training diverged). "
                        "Train again with a lower --lora_lr, or save an earlier checkpoint's adapter."
                    )
        kwargs.setdefault("save_embedding_layers", False)  # "auto" would look the base model up on the Hub
        self._model_card_info = model_card_info
        try:
            super().save_pretrained(
                save_directory, safe_serialization=True, selected_adapters=selected_adapters, **kwargs
            )
        finally:
            self._model_card_info = None
        if not kwargs.get("is_main_process", True):
            return
        content = (json.dumps(self.classifier.to_dict(), indent=2, ensure_ascii=False) + "\n").encode()
        for name in names:
            folder = Path(save_directory, "" if name == "default" else name)  # where PEFT saves each adapter
            atomic_write_bytes(folder / CLASSIFIER_CONFIG_FILE, content)
            if (folder / SAFETENSORS_WEIGHTS_NAME).is_file():  # safetensors writes through a 0600 temporary file
                os.chmod(folder / SAFETENSORS_WEIGHTS_NAME, plain_file_mode())

    def create_or_update_model_card(self, output_dir: str) -> None:
        """A card that says what the adapter is and how to load it, with or without dpt_peft."""
        card = lora_model_card(self.classifier, getattr(self, "_model_card_info", None))
        card.save(os.path.join(output_dir, "README.md"))
