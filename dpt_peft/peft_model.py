"""`DPTPeftModel`: the `PeftModel` that `get_peft_model` and `PeftModel.from_pretrained` return for DPT.

`PeftModel.forward` calls CLIP's own forward, which needs `input_ids` and returns image-text similarities.
DPT classifies images over its class names, so this subclass routes `forward` to `DPTModel.classify`
(the same way PEFT's `PeftModelForSequenceClassification` owns its task's forward). It is also the one public seam
of the tools (training, SPT, visualization, pipelines): typed methods that ask the tuner, so no tool reaches through
`model.base_model`.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from peft import PeftModel, get_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from torch import nn
from transformers import PreTrainedTokenizerBase

from .adapter_files import AdapterFileError
from .backbones import Backbone
from .class_prompts import TaskClasses
from .config_checks import checked_zero_shot_ensemble
from .layer import DPTLayer, ParameterKind
from .model_card import ModelCardInfo, build_model_card
from .outputs import DPTOutput
from .utils.durable import plain_file_mode
from .utils.errors import InputTypeError, UserInputError

# Passed by generic training loops (transformers' Trainer among them); they do not change a DPT forward.
IGNORED_FORWARD_ARGUMENTS = {"return_dict", "return_loss"}
# What DPTTrainer tells Trainer to leave out of the predictions, so compute_metrics receives the logits alone (a plain
# Trainer gathers every output but the loss, concatenated over batches).
NON_PREDICTION_OUTPUTS = [name for name in DPTOutput.__dataclass_fields__ if name not in ("loss", "logits")]
# Training without labels is how transformers' Trainer calls a PEFT model whose labels it could not detect.
MISSING_LABELS_WARNING = (
    "A DPT forward in training mode without labels computes no loss. Under transformers' Trainer: it looks for label "
    "arguments in the base model's forward (CLIPModel's has none), so pass TrainingArguments(label_names=['labels']) "
    "or use dpt_peft.DPTTrainer."
)
# transformers' push_to_hub arguments that have nothing to do for an adapter of a few MB saved as safetensors.
IGNORED_PUSH_ARGUMENTS = {"max_shard_size", "use_temp_dir", "use_auth_token"}


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
        output_text_embeds: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> DPTOutput:
        """Logits over the adapter's classes (or `class_names`, for this call only) for `pixel_values`, and the loss
        when `labels` are given: their mean loss, or, with `num_items_in_batch` (transformers' Trainer under gradient
        accumulation), their summed loss divided by it.

        Every output but the scalar losses is batch-first (or absent), so transformers' Trainer can concatenate them
        over batches; the class features `text_embeds` (`[C, P]`) come only with `output_text_embeds=True`.

        Under `with model.disable_adapter():` this is the base `CLIPModel.forward`, called with the same
        arguments (e.g. `input_ids` and `pixel_values`), so the base model's behaviour is unchanged.
        """
        if not torch.compiler.is_compiling():
            self._check_not_unloaded("run forward")
        if not self.has_active_enabled_adapter:
            return self.get_base_model()(pixel_values=pixel_values, **kwargs)
        if kwargs.get("input_ids") is not None:
            raise UserInputError(
                "A DPT adapter classifies images over its class names and takes no input_ids; call "
                "model(pixel_values=..., labels=...), or use `with model.disable_adapter():` for plain CLIP."
            )
        unexpected = sorted(k for k, v in kwargs.items() if v is not None and k not in IGNORED_FORWARD_ARGUMENTS)
        if unexpected:
            raise InputTypeError(
                f"Unexpected argument(s) {unexpected}; a DPT forward takes pixel_values, labels, task, guidance, "
                "output_zero_shot_logits, output_attentions, attention_classes, class_names, "
                "zero_shot_image_features and output_text_embeds."
            )
        if pixel_values is None:
            raise UserInputError("pixel_values is required: model(pixel_values=..., labels=...).")
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
            output_text_embeds=output_text_embeds,
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

    # ------------------------------------------------------------------ the tools' seam: each asks the tuner
    @property
    def backbone(self) -> Backbone:
        """The base model's family seam: where its layers are, how it featurizes, scales logits and frames tokens."""
        return self.base_model.backbone

    def adapter_parameters(self, adapter_name: str | None = None) -> dict[str, tuple[ParameterKind, nn.Parameter]]:
        """Every prompt parameter of an adapter (default: the active one): key as saved -> (kind, parameter)."""
        return self.base_model.adapter_parameters(adapter_name)

    def visual_prompts(self, adapter_name: str | None = None) -> dict[int, nn.Parameter]:
        """Deep visual prompts `[n_vis, D]` of an adapter, by vision layer index."""
        return self.base_model.visual_prompts(adapter_name)

    def class_aware_layers(self, adapter_name: str | None = None) -> list[int]:
        """Indices of the vision layers with class-aware prompts of an adapter."""
        return self.base_model.class_aware_layers(adapter_name)

    def text_context(self, adapter_name: str | None = None) -> nn.Parameter | None:
        """The learned context of an adapter (`[n_ctx, E]` or `[C, n_ctx, E]`), or None when it learns none."""
        return self.base_model.text_context(adapter_name)

    def token_embedding(self) -> nn.Embedding:
        """The text encoder's vocabulary embedding."""
        return self.base_model.token_embedding()

    def tokenizer(self, adapter_name: str | None = None) -> PreTrainedTokenizerBase:
        """The tokenizer an adapter's class prompts were built with."""
        return self.base_model.tokenizer(adapter_name)

    def class_text_features(self, task: str | None = None, adapter_name: str | None = None) -> torch.Tensor:
        """Class features with the learned context `[C, P]` (un-normalized; cached at inference)."""
        return self.base_model.class_text_features(task, adapter_name)

    def zero_shot_text_features(self, task: str | None = None, adapter_name: str | None = None) -> torch.Tensor:
        """Frozen class features of `zero_shot_template` `[C, P]` (un-normalized; cached)."""
        return self.base_model.zero_shot_text_features(task, adapter_name)

    def zero_shot_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features `[B, P]` of the frozen, prompt-free model (what `forward(zero_shot_image_features=...)`
        takes, computed once per evaluation set)."""
        return self.base_model.zero_shot_image_features(pixel_values)

    def frozen_layer_inputs(
        self, pixel_values: torch.Tensor, layers: list[int], consume: Callable[[int, torch.Tensor], None]
    ) -> None:
        """Hand `consume(layer, tokens [B, N, D])` the tokens entering each of `layers` in the frozen model."""
        self.base_model.frozen_layer_inputs(pixel_values, layers, consume)

    def label_space_for(self, class_names: list[str], adapter_name: str | None = None) -> TaskClasses:
        """The tokenized label space `forward(class_names=...)` would use; raises ValueError if the adapter cannot
        classify over these names."""
        return self.base_model.label_space_for(class_names, adapter_name)

    def class_names(self, task: str | None = None, adapter_name: str | None = None) -> list[str]:
        """The classes of a task of an adapter (default: the active adapter's only task), in label order."""
        return self.base_model.class_names(task, adapter_name)

    def set_class_names(
        self,
        class_names: list[str] | dict[str, list[str]],
        adapter_name: str | None = None,
        zero_shot_template: str | None = None,
    ) -> None:
        """Switch an adapter's label space for good, keeping its learned prompts (see `DPTModel.set_class_names`)."""
        self.base_model.set_class_names(class_names, adapter_name, zero_shot_template)

    def set_zero_shot_ensemble(self, weight: float | None, adapter_name: str | None = None) -> None:
        """Mix the adapter's class probabilities (weight `weight`, in [0, 1]) with the frozen zero-shot classifier's
        (the rest) in every forward in eval mode; None: the adapter alone. It is the config's `zero_shot_ensemble`,
        so a saved adapter records it (docs/method.md, section 10)."""
        adapter_name = adapter_name or self.active_adapter
        self.base_model.check_adapter_names(adapter_name)
        self.peft_config[adapter_name].zero_shot_ensemble = checked_zero_shot_ensemble(weight)

    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        model_card_info: ModelCardInfo | None = None,
        **kwargs,
    ) -> None:
        """`PeftModel.save_pretrained`, refused for an unloaded model, for NaN or infinite prompt tensors (a
        diverged training run) and for `safe_serialization=False` (a pickle, which dpt_peft never loads), so a saved
        adapter can always be loaded and holds usable prompts. `model_card_info` (training data, metrics, the base
        model's Hub id) goes into the model card written beside the adapter (a card already there is updated).
        The weights file gets the mode a plain `open()` gives under the umask, as the config beside it."""
        self._check_not_unloaded("save the adapter")
        if not safe_serialization:
            raise UserInputError(
                "safe_serialization=False would write adapter_model.bin, a pickle, which dpt_peft never loads (a "
                "pickle can run code when loaded); drop the argument to save the adapter as safetensors."
            )
        for name in selected_adapters or list(self.peft_config):
            if name not in self.peft_config:
                continue  # PeftModel.save_pretrained names the unknown adapter
            state = get_peft_model_state_dict(
                self, state_dict=kwargs.get("state_dict"), adapter_name=name, save_embedding_layers=False
            )
            for key, tensor in state.items():
                if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise UserInputError(
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
        if kwargs.get("is_main_process", True):
            for name in selected_adapters or list(self.peft_config):
                folder = Path(save_directory, "" if name == "default" else name)  # where PEFT saves each adapter
                weights = folder / SAFETENSORS_WEIGHTS_NAME
                if weights.is_file():  # safetensors writes through a temporary file, created 0600
                    os.chmod(weights, plain_file_mode())

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        self.base_model.check_adapter_names(adapter_name)
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.check_adapter_names(adapter_name, "does not exist")
        super().delete_adapter(adapter_name)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args: Any, **kwargs: Any):
        """`PeftModel.load_adapter`, but a file that cannot be read, or that does not fill every prompt tensor,
        fails with a clear error and leaves no half-loaded adapter behind."""
        existed = adapter_name in self.peft_config
        try:
            folder = Path(model_id, kwargs.get("subfolder") or "")
            if folder.is_dir() and not (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
                raise AdapterFileError(  # a config alone loads as a config (DPTConfig.from_pretrained); never a pickle
                    f"The adapter folder {str(folder)!r} holds no {SAFETENSORS_WEIGHTS_NAME}, so there are no prompts "
                    "to load (dpt_peft loads only safetensors); give the folder save_pretrained wrote."
                )
            result = super().load_adapter(model_id, adapter_name, *args, **kwargs)
        except Exception as err:
            self._roll_back(adapter_name, existed)
            if isinstance(err, ValueError):  # our own checks already name the field and the fix
                raise
            raise UserInputError(
                f"Could not load the DPT adapter from {str(model_id)!r}: {err}. The file may be truncated or "
                "corrupt, or made for another base model; save or download it again."
            ) from err

        # Only this adapter's keys, matched as a whole key component: PEFT's own filter matches substrings, so the
        # other adapters' keys would be reported for a name like "c" (in "encoder") or "text".
        def ours(key: str) -> bool:
            return re.search(rf"\.dpt_\w+\.{re.escape(adapter_name)}(\.|$)", key) is not None

        missing = [k for k in result.missing_keys if ours(k)]
        unexpected = list(result.unexpected_keys)  # every key of the file is this adapter's: no other tensor loads
        if missing or unexpected:
            self._roll_back(adapter_name, existed)
            raise UserInputError(
                f"The adapter file in {str(model_id)!r} does not match its config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}. Save the adapter again with save_pretrained."
            )
        for key, (_, parameter) in self.adapter_parameters(adapter_name).items():
            if not bool(torch.isfinite(parameter).all()):  # a diverged run's prompts would predict NaN scores
                self._roll_back(adapter_name, existed)
                raise UserInputError(
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
            raise UserInputError(
                "safe_serialization=False: DPT adapters are only saved as safetensors; drop the argument."
            )
        unexpected = sorted(set(kwargs) - IGNORED_PUSH_ARGUMENTS)
        if unexpected:
            raise InputTypeError(
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
        training data, metrics and usage, with no placeholders; `save_pretrained(model_card_info=...)` fills it.

        As PEFT's: a card already in `output_dir` is updated, not replaced (its text and metadata stay; DPT's section
        is added, or replaced when it is there from an earlier save), and the base model's tags (`add_model_tags`)
        join the card's."""
        info = getattr(self, "_model_card_info", None) or ModelCardInfo()
        path = os.path.join(output_dir, "README.md")
        existing = ModelCard.load(path) if os.path.isfile(path) else None
        base_tags = getattr(self.get_base_model(), "model_tags", None) or []
        build_model_card(dict(self.peft_config), info, existing=existing, base_model_tags=base_tags).save(path)
