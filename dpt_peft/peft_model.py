"""`DPTPeftModel`: the `PeftModel` that `get_peft_model` and `PeftModel.from_pretrained` return for DPT.

`PeftModel.forward` calls CLIP's own forward, which needs `input_ids` and returns image-text similarities.
DPT classifies images over its class names, so this subclass routes `forward` to `DPTModel.classify`
(the same way PEFT's `PeftModelForSequenceClassification` owns its task's forward).
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from peft import PeftModel, get_peft_model_state_dict

from .layer import DPTLayer
from .model_card import ModelCardInfo, build_model_card
from .outputs import DPTOutput

# Passed by generic training loops (transformers' Trainer among them); they do not change a DPT forward.
IGNORED_FORWARD_ARGUMENTS = {"return_dict", "return_loss"}
NON_PREDICTION_OUTPUTS = [name for name in DPTOutput.__dataclass_fields__ if name not in ("loss", "logits")]
# Training without labels is how transformers' Trainer calls a PEFT model whose labels it could not detect.
MISSING_LABELS_WARNING = (
    "A DPT forward in training mode without labels computes no loss. Under transformers' Trainer: it looks for label "
    "arguments in the base model's forward (CLIPModel's has none), so pass TrainingArguments(label_names=['labels']) "
    "or use dpt_peft.DPTTrainer."
)
# transformers' push_to_hub arguments that have nothing to do for an adapter of a few MB saved as safetensors.
IGNORED_PUSH_ARGUMENTS = {"max_shard_size", "use_temp_dir", "use_auth_token"}


def shared_config(config_class: type, attributes: dict) -> Any:
    """A `config_class` object whose attributes are `attributes` itself, not a copy."""
    config = object.__new__(config_class)
    config.__dict__ = attributes
    return config


@functools.cache
def trainer_config_class(config_class: type) -> type:
    """`config_class` with transformers' `keys_to_ignore_at_inference` hint (see `DPTPeftModel.config`); one class
    per config class, so `type(model.config)` is stable and still an instance of the user's config class."""

    def reduce_as_user_config(view: Any, protocol: int) -> tuple:
        # pickled and copied as the user's config class: this subclass exists only in this process
        return shared_config, (config_class, view.__dict__)

    hint = {"keys_to_ignore_at_inference": NON_PREDICTION_OUTPUTS, "__reduce_ex__": reduce_as_user_config}
    return type(config_class.__name__, (config_class,), hint)


class DPTPeftModel(PeftModel):
    """A CLIP adapted by DPT prompts; see [`DPTModel.classify`] for what `forward` computes.

    A plain transformers `Trainer` needs `TrainingArguments(label_names=["labels"])` (`DPTTrainer` sets it): Trainer
    looks for label arguments in the forward of `get_base_model()`'s class (CLIPModel's, which has none), never in
    this one, so without it the `labels` column is dropped, evaluation has no eval_loss and compute_metrics is not
    called.
    """

    def __init__(self, model: torch.nn.Module, peft_config, adapter_name: str = "default", **kwargs: Any) -> None:
        with warnings.catch_warnings():  # PEFT asks transformers for a name it deprecated; nothing for a user to do
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            super().__init__(model, peft_config, adapter_name, **kwargs)

    @property
    def config(self) -> Any:
        """The base model's config, seen with `keys_to_ignore_at_inference`: transformers' Trainer gathers every output
        but those `model.config` names, and the class features have no batch dimension to concatenate (predictions
        are the logits). It shares the user's config's attributes (reading or setting one reads or sets theirs), and
        the hint is a class attribute, so the user's config object and its config.json stay as they were."""
        config = self.get_base_model().config
        return shared_config(trainer_config_class(type(config)), config.__dict__)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task: str | None = None,
        guidance: bool = False,
        output_zero_shot_logits: bool = False,
        output_attentions: bool = False,
        attention_classes: torch.Tensor | None = None,
        class_names: list[str] | None = None,
        zero_shot_image_features: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> DPTOutput:
        """Logits over the adapter's classes (or `class_names`, for this call only) for `pixel_values`, and the loss
        when `labels` are given: their mean loss, or, with `num_items_in_batch` (transformers' Trainer under gradient
        accumulation), their summed loss divided by it.

        Under `with model.disable_adapter():` this is the base `CLIPModel.forward`, called with the same
        arguments (e.g. `input_ids` and `pixel_values`), so the base model's behaviour is unchanged.
        """
        if not torch.compiler.is_compiling():
            self._check_not_unloaded("run forward")
        if not self.has_active_enabled_adapter:
            return self.get_base_model()(pixel_values=pixel_values, **kwargs)
        if kwargs.get("input_ids") is not None:
            raise ValueError(
                "A DPT adapter classifies images over its class names and takes no input_ids; call "
                "model(pixel_values=..., labels=...), or use `with model.disable_adapter():` for plain CLIP."
            )
        unexpected = sorted(k for k, v in kwargs.items() if v is not None and k not in IGNORED_FORWARD_ARGUMENTS)
        if unexpected:
            raise TypeError(
                f"Unexpected argument(s) {unexpected}; a DPT forward takes pixel_values, labels, task, guidance, "
                "output_zero_shot_logits, output_attentions, attention_classes, class_names and "
                "zero_shot_image_features."
            )
        if pixel_values is None:
            raise ValueError("pixel_values is required: model(pixel_values=..., labels=...).")
        if labels is None and self.training and torch.is_grad_enabled():
            warnings.warn(MISSING_LABELS_WARNING, UserWarning, stacklevel=2)
        output = self.base_model.classify(
            pixel_values,
            labels=labels,
            task=task,
            guidance=guidance,
            output_zero_shot_logits=output_zero_shot_logits,
            output_attentions=output_attentions,
            attention_classes=attention_classes,
            class_names=class_names,
            zero_shot_image_features=zero_shot_image_features,
        )
        if output.loss is not None and num_items_in_batch is not None:
            # transformers' Trainer contract for models taking **kwargs: the loss is a sum over the images of the
            # accumulated batches divided by their count, so Trainer does not divide it by the accumulation steps.
            output.loss = output.loss * len(pixel_values) / num_items_in_batch
        return output

    @property
    def is_unloaded(self) -> bool:
        """True after `model.unload()`: CLIP's original modules are back and no DPT prompt is left."""
        return not any(isinstance(module, DPTLayer) for module in self.base_model.model.modules())

    def _check_not_unloaded(self, action: str) -> None:
        if self.is_unloaded:
            raise RuntimeError(
                f"Cannot {action}: this DPTPeftModel was unloaded (model.unload() put CLIP's original modules back, "
                "so it holds no DPT prompts). Use the CLIPModel that unload() returned for plain CLIP, or load the "
                "adapter again with PeftModel.from_pretrained(clip, adapter_dir)."
            )

    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        model_card_info: ModelCardInfo | None = None,
        **kwargs,
    ) -> None:
        """`PeftModel.save_pretrained`, refused for an unloaded model and for NaN or infinite prompt tensors (a
        diverged training run), so a saved adapter always holds usable prompts. `model_card_info` (training data,
        metrics, the base model's Hub id) goes into the model card written beside the adapter."""
        self._check_not_unloaded("save the adapter")
        for name in selected_adapters or list(self.peft_config):
            if name not in self.peft_config:
                continue  # PeftModel.save_pretrained names the unknown adapter
            state = get_peft_model_state_dict(
                self, state_dict=kwargs.get("state_dict"), adapter_name=name, save_embedding_layers=False
            )
            for key, tensor in state.items():
                if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise ValueError(
                        f"Refusing to save adapter {name!r}: tensor {key!r} holds {bad} NaN or infinite value(s) of "
                        f"{tensor.numel()}, so the adapter would be unusable (training diverged). Train again with "
                        "lower learning rates, or save an earlier checkpoint's adapter."
                    )
        kwargs.setdefault("save_embedding_layers", False)  # "auto" would look the base model up on the Hub
        self._model_card_info = model_card_info  # read by create_or_update_model_card, which PEFT calls per adapter
        try:
            super().save_pretrained(
                save_directory, safe_serialization=safe_serialization, selected_adapters=selected_adapters, **kwargs
            )
        finally:
            self._model_card_info = None

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        self.base_model.check_adapter_names(adapter_name)
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.check_adapter_names(adapter_name)
        super().delete_adapter(adapter_name)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args: Any, **kwargs: Any):
        """`PeftModel.load_adapter`, but a file that cannot be read, or that does not fill every prompt tensor,
        fails with a clear error and leaves no half-loaded adapter behind."""
        existed = adapter_name in self.peft_config
        try:
            result = super().load_adapter(model_id, adapter_name, *args, **kwargs)
        except Exception as err:
            self._roll_back(adapter_name, existed)
            if isinstance(err, ValueError):  # our own checks already name the field and the fix
                raise
            raise ValueError(
                f"Could not load the DPT adapter from {str(model_id)!r}: {err}. The file may be truncated or "
                "corrupt, or made for another base model; save or download it again."
            ) from err

        # Only this adapter's keys, matched as a whole key component: PEFT's own filter matches substrings, so the
        # other adapters' keys would be reported for a name like "c" (in "encoder") or "text".
        def ours(key: str) -> bool:
            return re.search(rf"\.dpt_\w+\.{re.escape(adapter_name)}(\.|$)", key) is not None

        missing = [k for k in result.missing_keys if ours(k)]
        unexpected = [k for k in result.unexpected_keys if ours(k)]
        if missing or unexpected:
            self._roll_back(adapter_name, existed)
            raise ValueError(
                f"The adapter file in {str(model_id)!r} does not match its config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}. Save the adapter again with save_pretrained."
            )
        for key, (_, parameter) in self.base_model.adapter_parameters(adapter_name).items():
            if not bool(torch.isfinite(parameter).all()):  # a diverged run's prompts would predict NaN scores
                self._roll_back(adapter_name, existed)
                raise ValueError(
                    f"The adapter in {str(model_id)!r} holds NaN or infinite values in {key}, so it cannot classify; "
                    "it comes from a diverged training run or a damaged file: use an earlier checkpoint's adapter."
                )
        return result

    def _roll_back(self, adapter_name: str, existed: bool) -> None:
        if adapter_name not in self.peft_config:
            return
        if len(self.peft_config) == 1:
            # The only adapter (PeftModel.from_pretrained): give the caller's CLIP back untouched.
            self.base_model.unload()
        elif not existed:
            self.delete_adapter(adapter_name)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        safe_serialization: bool = True,
        commit_description: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Upload the adapter files and its model card to `repo_id`; takes transformers' usual keyword arguments.

        transformers' `push_to_hub` replaces the card that `save_pretrained` writes with the one on the Hub (a
        blank template for a new repo); this keeps ours, which says the method, base model, classes and config.
        `tags` are added to the card's; `safe_serialization=False` is refused (adapters are only saved as
        safetensors); `max_shard_size`, `use_temp_dir` and `use_auth_token` are accepted and have nothing to do.
        """
        if not safe_serialization:
            raise ValueError("safe_serialization=False: DPT adapters are only saved as safetensors; drop the argument.")
        unexpected = sorted(set(kwargs) - IGNORED_PUSH_ARGUMENTS)
        if unexpected:
            raise TypeError(
                f"push_to_hub got unexpected argument(s) {unexpected}; it takes commit_message, private, token, "
                "revision, create_pr, tags, safe_serialization and commit_description."
            )
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            if tags:
                card = ModelCard.load(os.path.join(folder, "README.md"))
                card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
                card.save(os.path.join(folder, "README.md"))
            operations = [
                CommitOperationAdd(path_in_repo=str(path.relative_to(folder)), path_or_fileobj=str(path))
                for path in sorted(Path(folder).rglob("*"))
                if path.is_file()
            ]
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message or "Upload DPT adapter",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Our card (`model_card.build_model_card`) instead of PEFT's template: the method, base model, classes,
        training data, metrics and usage, with no placeholders; `save_pretrained(model_card_info=...)` fills it."""
        info = getattr(self, "_model_card_info", None) or ModelCardInfo()
        build_model_card(dict(self.peft_config), info).save(os.path.join(output_dir, "README.md"))
