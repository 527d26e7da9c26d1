"""An adapted model as a plain module of `pixel_values` only: what `torch.export` and the ONNX exporter take.

At serving time an adapter that classifies a fixed set of classes is an image encoder with prompts plus constant
class features. `ServingClassifier` computes the class side once, under `no_grad` and outside any tracing, and keeps
it as buffers, so a traced graph never reaches the model's class-feature cache (keyed by tensor storage, which traced
tensors do not have), its tokenizer or its label spaces. Its forward is `DPTModel.classify` at inference: CAVPT's
frozen pass picks each image's top-K classes (K is fixed: a static shape), the prompted pass, the family's logits.
An adapter saved with a zero-shot ensemble (`zero_shot_ensemble`) is served with it, as `evaluate` and `predict` score
it: its logits are the log of the mixed probabilities. `export_program` traces it with a dynamic batch dimension and
drops the weights the image path never reads (the text tower's), so a saved program holds the image side only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind

from ..consistency import ensemble_logits
from ..peft_model import DPTPeftModel
from ..utils.errors import InputTypeError, UserInputError

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("logits", "image_embeds")


class ServingClassifier(nn.Module):
    """`forward(pixel_values [B, 3, H, W]) -> logits [B, C]` (float32), and the image features `[B, P]` with
    `output_image_embeds=True`, over one fixed class list, with no Python-side state between calls.

    Its logits are the adapter's own (`model(pixel_values=...).logits`) within float tolerance. The class list is the
    model's label space of `task` (switch it first with `model.set_class_names` to serve other classes). The module
    holds the model, so `.to(torch.float16)` casts both; inputs are cast to the module's dtype, outputs are float32.
    """

    def __init__(self, model: DPTPeftModel, task: str | None = None, output_image_embeds: bool = False) -> None:
        super().__init__()
        if not isinstance(model, DPTPeftModel):
            raise InputTypeError(f"ServingClassifier takes a DPTPeftModel (a loaded DPT adapter), not {type(model)}.")
        if model.is_unloaded or not model.has_active_enabled_adapter:
            raise UserInputError(
                "This model has no active DPT adapter (unloaded, or its adapters disabled), so there is nothing to "
                "serve; load the adapter again (dpt_peft.load_adapted_model)."
            )
        self.model = model.eval()
        self.class_names = model.class_names(task)
        self.output_image_embeds = output_image_embeds
        config = model.peft_config[model.active_adapter]
        # CAVPT's queries are each image's top-K classes, picked by the frozen model's zero-shot logits.
        self.top_k = min(config.class_aware_top_k, len(self.class_names)) if config.class_aware else 0
        self.ensemble_weight = config.zero_shot_ensemble  # a float or None: a constant of the traced graph
        with torch.no_grad():
            self.register_buffer("class_features", model.class_text_features(task).detach().clone())
            if self.top_k or self.ensemble_weight is not None:
                zero_shot = model.zero_shot_text_features(task).detach().clone()
                self.register_buffer("zero_shot_class_features", zero_shot)

    @property
    def output_names(self) -> list[str]:
        return list(OUTPUT_NAMES if self.output_image_embeds else OUTPUT_NAMES[:1])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        backbone = self.model.backbone
        pixel_values = pixel_values.to(self.class_features.dtype)
        inputs, zero_shot_logits = {}, None
        if self.top_k or self.ensemble_weight is not None:
            frozen = self.model.zero_shot_image_features(pixel_values)
            zero_shot_logits = backbone.logits(frozen, self.zero_shot_class_features)
        if self.top_k:
            inputs["class_features"] = self.class_features[zero_shot_logits.topk(self.top_k, dim=-1).indices]
        with self.model.forward_context(**inputs):  # PeftModel hands the tuner's forward_context through
            image = backbone.image_features(pixel_values)
        logits = backbone.logits(image, self.class_features).float()
        if self.ensemble_weight is not None:
            logits = ensemble_logits(logits, zero_shot_logits.float(), self.ensemble_weight)
        return (logits, image.float()) if self.output_image_embeds else logits


def export_program(module: ServingClassifier, pixel_values: torch.Tensor) -> ExportedProgram:
    """`torch.export` of `module` with a dynamic batch dimension (trace with 2 or more images: a batch of 1 would be
    specialized), without the weights its graph never reads."""
    if len(pixel_values) < 2:
        raise UserInputError("export_program traces with a batch of at least 2 images, so the batch stays dynamic.")
    batch = Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(module.eval(), (pixel_values,), dynamic_shapes={INPUT_NAME: {0: batch}})
    return without_unused_weights(program)


def without_unused_weights(program: ExportedProgram) -> ExportedProgram:
    """`program` without the parameters, buffers and constants no node reads. `torch.export` lifts every weight of
    the module, and the serving module holds the whole model, text tower included, whose class side is in buffers."""
    graph = copy.deepcopy(program.graph)
    weights = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    unused = {node.name for node in graph.nodes if node.op == "placeholder" and not node.users}
    specs = [s for s in program.graph_signature.input_specs if not (s.kind in weights and s.arg.name in unused)]
    kept_names = {spec.arg.name for spec in specs}
    for node in [n for n in graph.nodes if n.op == "placeholder" and n.name not in kept_names]:
        graph.erase_node(node)
    kept = {spec.target for spec in specs if spec.kind in weights}
    return ExportedProgram(
        root=program.graph_module,
        graph=graph,
        graph_signature=ExportGraphSignature(input_specs=specs, output_specs=program.graph_signature.output_specs),
        state_dict={name: value for name, value in program.state_dict.items() if name in kept},
        range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs,
        constants={name: value for name, value in program.constants.items() if name in kept},
        verifiers=[program.verifier],
    )
