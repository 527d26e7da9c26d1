"""`LabelSpaces`: each adapter's tokenizer, tokenized task classes and one-call label space, owned by the tuner.

The tuner tells it when an adapter comes, changes classes or goes, and asks it for the classes of a forward. It is
handed the tokenizer, the family's prompt format and the text context length, and never reaches back into the tuner
or the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .backbones import PromptFormat
from .class_prompts import TaskClasses, build_label_space, context_init_ids
from .config import DPTConfig
from .sources import resolve
from .utils.errors import UserInputError


@dataclass
class _AdapterLabels:
    tokenizer: PreTrainedTokenizerBase
    prompt_format: PromptFormat
    tasks: dict[str, TaskClasses]
    one_call: TaskClasses | None = None  # the last other label space asked for (`classify(class_names=...)`)


class LabelSpaces:
    """The tokenized label spaces of a tuner's adapters, by adapter name."""

    def __init__(self) -> None:
        self._adapters: dict[str, _AdapterLabels] = {}

    @staticmethod
    def tokenize(
        config: DPTConfig, tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat, context_length: int
    ) -> dict[str, TaskClasses]:
        """Every task of `config` tokenized, without keeping it (validation before anything changes)."""
        return build_label_space(config, tokenizer, prompt_format, context_length)

    def tokenize_for(self, adapter_name: str, config: DPTConfig, context_length: int) -> dict[str, TaskClasses]:
        """`config`'s tasks tokenized with an adapter's tokenizer and prompt format, without keeping them."""
        labels = self._adapters[adapter_name]
        return self.tokenize(config, labels.tokenizer, labels.prompt_format, context_length)

    def add(
        self,
        adapter_name: str,
        tokenizer: PreTrainedTokenizerBase,
        prompt_format: PromptFormat,
        tasks: dict[str, TaskClasses],
    ) -> None:
        self._adapters[adapter_name] = _AdapterLabels(tokenizer, prompt_format, tasks)

    def replace(self, adapter_name: str, tasks: dict[str, TaskClasses]) -> None:
        """New classes for an adapter (`set_class_names`)."""
        self._adapters[adapter_name].tasks = tasks

    def forget(self, adapter_name: str) -> None:
        self._adapters.pop(adapter_name, None)

    def load_tokenizer(self, config: DPTConfig, model_name_or_path: str, family: str) -> PreTrainedTokenizerBase:
        """The tokenizer of a new adapter: `config.tokenizer_name_or_path`, else the base model's own name (the path
        recorded at training time may not exist on this machine), else the recorded base; adapters on one base model
        share it. `family` names the model family in messages ("CLIP", "SigLIP")."""
        source = config.tokenizer_name_or_path or model_name_or_path or config.base_model_name_or_path
        if not source:
            raise UserInputError(
                f"No {family} tokenizer found: the base model has no name_or_path (built from a config?). Set "
                f"tokenizer_name_or_path in DPTConfig to a directory or Hub id with the {family} tokenizer."
            )
        loaded = next((a.tokenizer for a in self._adapters.values() if a.tokenizer.name_or_path == source), None)
        if loaded is not None:
            return loaded
        try:
            return AutoTokenizer.from_pretrained(resolve(source))
        except (OSError, ValueError) as err:
            raise UserInputError(
                f"Could not load a {family} tokenizer from {source!r} ({err}). Set tokenizer_name_or_path in "
                "DPTConfig to a directory or Hub id that holds the base model's tokenizer."
            ) from err

    def tokenizer(self, adapter_name: str) -> PreTrainedTokenizerBase:
        return self._adapters[adapter_name].tokenizer

    def prompt_format(self, adapter_name: str) -> PromptFormat:
        return self._adapters[adapter_name].prompt_format

    def context_init_ids(self, adapter_name: str, phrase: str) -> list[int]:
        """Token ids of an init phrase in this adapter's tokenizer (their embeddings start the context)."""
        labels = self._adapters[adapter_name]
        return context_init_ids(labels.tokenizer, labels.prompt_format, phrase)

    def tasks(self, adapter_name: str) -> dict[str, TaskClasses]:
        return self._adapters[adapter_name].tasks

    def num_classes(self, adapter_name: str) -> int:
        """Classes of the adapter's whole label space (all tasks)."""
        return sum(t.num_classes for t in self.tasks(adapter_name).values())

    def task_classes(self, adapter_name: str, task: str | None = None) -> TaskClasses:
        """One task's tokenized label space (`task` may be None for a single-task adapter)."""
        tasks = self.tasks(adapter_name)
        if task is None:
            if len(tasks) > 1:
                raise UserInputError(f"This adapter has several tasks; pass task= one of {sorted(tasks)}.")
            return next(iter(tasks.values()))
        if task not in tasks:
            raise UserInputError(f"Unknown task {task!r}; the tasks of adapter {adapter_name!r} are {sorted(tasks)}.")
        return tasks[task]

    def for_call(
        self, adapter_name: str, config: DPTConfig, class_names: list[str], context_length: int
    ) -> TaskClasses:
        """A tokenized label space of other classes for one call: the adapter's own classes stay as they are. The
        last one asked is kept per adapter, so repeated calls with the same classes tokenize once."""
        labels = self._adapters[adapter_name]
        names = tuple(class_names)
        if labels.one_call is not None and labels.one_call.names == names:
            return labels.one_call
        if config.class_specific_context and names != self.task_classes(adapter_name).names:
            raise UserInputError(
                "This adapter learned one text context per class (class_specific_context=True), so it can only "
                f"classify over its own classes {list(self.task_classes(adapter_name).names)}, not {list(names)}."
            )
        other = dataclasses.replace(config, class_names=list(names))
        tasks = self.tokenize_for(adapter_name, other, context_length)
        labels.one_call = next(iter(tasks.values()))
        return labels.one_call
