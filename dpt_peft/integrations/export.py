"""`export_adapter`: a trained adapter as a file that serves without dpt_peft, PEFT or transformers (`dpt-peft export`).

The adapter is loaded and checked by the one loader (a NaN adapter or a mismatched base is refused there, before any
export), turned into a `ServingClassifier` (class features as constants) and traced once (`export_program`); the
program is written as ONNX (the dynamo exporter, dynamic batch) or as a `torch.export` program, with the image
processor's config, the class names and a README saying how to run it, all through the write policy. Before the
other files are written, the file just written is run (onnxruntime, or `torch.export.load`) on a few images at batch
1 and N and compared with the adapter's own PyTorch forward: beyond the tolerance, it is removed and the export
refused, naming the difference.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.images import open_rgb
from ..sources import load_adapted_model
from ..toy.shapes import render
from ..utils.errors import UserInputError
from ..utils.write_policy import OutputFolder
from .inference import expand_paths
from .serving import INPUT_NAME, ServingClassifier, export_program

FORMATS = {"onnx": "model.onnx", "torch": "model.pt2"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# The check against PyTorch: each output may differ by this fraction of its scale (the logit scale for logits, the
# largest feature norm for image embeddings), i.e. by this much in cosine similarity. fp16 rounds every layer.
TOLERANCES = {"fp32": 1e-5, "fp16": 1e-2}
EXPORT_EXTRA = "pip install dpt-peft[export]"
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
MIN_OPSET = 18  # the dynamo exporter's lowest; it raises a lower request to this one
SYNTHETIC_CHECK_IMAGES = 5
CLASS_NAMES_FILE = "class_names.json"
PROCESSOR_FILE = "preprocessor_config.json"
README_FILE = "README.md"
METADATA_PREFIX = "dpt_peft."  # the ONNX metadata keys (and .pt2 extra files) that record what the file serves


class ExportCheckError(UserInputError):
    """The exported file's outputs differ from PyTorch's beyond the tolerance (the file is removed)."""


@dataclass
class ExportResult:
    model_file: Path
    class_names: list[str]
    max_difference: float  # of the logits, as a fraction of the logit scale (a cosine similarity)
    tolerance: float
    num_images: int
    files: list[str]


def require_export_packages(format: str) -> None:
    """ONNX export and its check need onnx, onnxruntime and onnxscript: the `export` extra."""
    missing = [name for name in ONNX_PACKAGES if find_spec(name) is None] if format == "onnx" else []
    if missing:
        raise UserInputError(
            f"--format onnx needs {', '.join(missing)} (not installed): `{EXPORT_EXTRA}`, or `--format torch` for a "
            "torch.export program."
        )


def check_pixel_values(processor, check_images: list[str] | None) -> torch.Tensor:
    """The images the export is checked on, preprocessed: the given files, else synthetic shapes (noisy, coloured)."""
    if check_images:
        images = [open_rgb(path) for path in expand_paths(check_images)]
    else:
        batch = render(np.random.default_rng(0), SYNTHETIC_CHECK_IMAGES, shift=1.0)
        images = [Image.fromarray(pixels) for pixels in batch.images]
    if len(images) < 2:
        raise UserInputError("--check_images: give at least 2 images (the batch dimension is checked at 1 and N).")
    return processor(images=images, return_tensors="pt")["pixel_values"]


def export_adapter(
    adapter: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    model_name_or_path: str | None = None,
    format: str = "onnx",
    dtype: str = "fp32",
    opset: int | None = None,
    output_image_embeds: bool = False,
    check_images: list[str] | None = None,
    overwrite_output_dir: bool = False,
) -> ExportResult:
    """Export `adapter` (over `class_names`, default its own) to `output_dir` as `FORMATS[format]` in `dtype`, checked
    against the adapter's PyTorch forward; see the module's docstring."""
    if format not in FORMATS or dtype not in DTYPES:
        raise UserInputError(
            f"format {format!r} / dtype {dtype!r}: choose a format of {list(FORMATS)} and a dtype of {list(DTYPES)}."
        )
    if opset is not None and format != "onnx":
        raise UserInputError(f"opset {opset} applies to the onnx format only; drop it for format {format!r}.")
    if opset is not None and opset < MIN_OPSET:
        raise UserInputError(
            f"opset {opset}: torch's dynamo exporter writes opset {MIN_OPSET} or later (it would silently give "
            f"{MIN_OPSET}); use {MIN_OPSET} or more, or leave it out for the exporter's default."
        )
    require_export_packages(format)
    folder = OutputFolder(output_dir)
    model_file = FORMATS[format]
    names = [model_file, CLASS_NAMES_FILE, PROCESSOR_FILE, README_FILE]
    inputs = [Path(adapter) / README_FILE, *(check_images or [])]  # exported into the adapter's folder: its card stays
    folder.check(names, "--overwrite_output_dir", overwrite_output_dir, inputs=inputs)
    model, processor = load_adapted_model(adapter, model_name_or_path, class_names, device="cpu")
    pixel_values = check_pixel_values(processor, check_images)
    with torch.no_grad():
        reference = model(pixel_values=pixel_values)
        scales = [float(model.backbone.logit_scale()), float(reference.image_embeds.norm(dim=-1).max())]
    module = ServingClassifier(model, output_image_embeds=output_image_embeds).to(DTYPES[dtype])
    program = export_program(module, pixel_values)
    config = model.peft_config[model.active_adapter]
    metadata = {
        "class_names": json.dumps(module.class_names),
        "base_model": config.base_model_name_or_path or "",
        "base_model_family": config.base_model_family or "",
        "dtype": dtype,
        "outputs": json.dumps(module.output_names),
        "version": _package_version(),
    }
    path = (_write_onnx if format == "onnx" else _write_program)(folder, model_file, program, module, opset, metadata)
    expected = [reference.logits, reference.image_embeds][: len(module.output_names)]
    try:
        difference = _check(path, format, pixel_values, expected, scales, module, TOLERANCES[dtype])
    except ExportCheckError:
        path.unlink()
        folder.forget(model_file)
        raise
    folder.write_json(CLASS_NAMES_FILE, module.class_names)
    folder.write_text(PROCESSOR_FILE, processor.to_json_string())
    opset_used = _opset_of(path) if format == "onnx" else None
    readme = serving_readme(
        model_file, module, processor.to_dict(), metadata, opset_used, difference, len(pixel_values)
    )
    folder.write_text(README_FILE, readme)
    return ExportResult(path, module.class_names, difference, TOLERANCES[dtype], len(pixel_values), names)


def _write_onnx(folder, name, program, module, opset, metadata) -> Path:
    with warnings.catch_warnings():  # torch's exporter calls a pytree API that torch itself deprecated
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        onnx_program = torch.onnx.export(
            program,
            (),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=module.output_names,
            verbose=False,
        )
    from onnx_ir.traversal import RecursiveGraphIterator

    for node in RecursiveGraphIterator(onnx_program.model.graph):
        node.metadata_props.clear()  # the exporter's stack traces: this machine's paths, and most of a small file
    for key, value in metadata.items():
        onnx_program.model.metadata_props[METADATA_PREFIX + key] = value
    return folder.write(name, lambda temporary: onnx_program.save(temporary, external_data=False))


def _write_program(folder, name, program, module, opset, metadata) -> Path:
    buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2, which a temporary file has not
    torch.export.save(program, buffer, extra_files={f"{METADATA_PREFIX}{k}": v for k, v in metadata.items()})
    return folder.write_bytes(name, buffer.getvalue())


def _runner(path: Path, format: str) -> Callable[[torch.Tensor], list[np.ndarray]]:
    """The written file, loaded as a server would load it: pixel values -> its outputs."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda pixel_values: session.run(None, {INPUT_NAME: pixel_values.numpy()})
    program = torch.export.load(path).module()

    def run(pixel_values: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            outputs = program(pixel_values)
        return [t.numpy() for t in (outputs if isinstance(outputs, tuple) else (outputs,))]

    return run


def _check(path, format, pixel_values, expected, scales, module, tolerance) -> float:
    """The largest logit difference as a fraction of the logit scale; `ExportCheckError` naming the worst difference
    when an output exceeds `tolerance`."""
    worst_logits = 0.0
    run = _runner(path, format)
    for batch in (1, len(pixel_values)):
        for name, output, reference, scale in zip(module.output_names, run(pixel_values[:batch]), expected, scales):
            difference = np.abs(output - reference[:batch].numpy())
            difference[np.isnan(difference)] = np.inf
            relative = float(difference.max()) / max(scale, 1e-12)
            if name == "logits":
                worst_logits = max(worst_logits, relative)
            if relative > tolerance:
                image, column = np.unravel_index(int(np.argmax(difference)), difference.shape)
                where = f"class {module.class_names[column]!r}" if name == "logits" else f"feature {column}"
                raise ExportCheckError(
                    f"The exported {path.name} differs from PyTorch: {name} of image {image} (batch {batch}), "
                    f"{where}, is {output[image, column]:.6g} instead of {reference[image, column]:.6g} "
                    f"({relative:.2e} of the scale {scale:.4g}, over the tolerance {tolerance:.0e}); the file was "
                    "removed. Report it with the command you ran; --dtype fp32 is the most exact."
                )
    return worst_logits


def _opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def preprocessing_steps(config: dict) -> list[str]:
    """The image processor's steps in words, for the README (what examples/serve_onnx.py implements)."""
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
    steps = ["convert to RGB"] if config.get("do_convert_rgb", True) else []
    size = config.get("size") or {}
    if config.get("do_resize"):
        how = resample.get(config.get("resample"), str(config.get("resample")))
        if "shortest_edge" in size:
            steps.append(f"resize the shorter side to {size['shortest_edge']} px ({how}, PIL)")
        else:
            steps.append(f"resize to {size.get('height')} x {size.get('width')} px ({how}, PIL)")
    if config.get("do_center_crop"):
        steps.append(f"centre-crop {config['crop_size']['height']} x {config['crop_size']['width']}")
    if config.get("do_rescale"):
        steps.append(f"multiply by {config['rescale_factor']:.6g}")
    if config.get("do_normalize"):
        steps.append(f"subtract mean {config['image_mean']}, divide by std {config['image_std']}")
    return [*steps, "channels first, float32 `[batch, 3, H, W]`"]


def serving_readme(model_file, module, processor_config, metadata, opset, difference, num_images) -> str:
    """The exported folder's card: what the file computes, its classes, preprocessing, how to run it, its check."""
    outputs = "`logits` float32 `[batch, C]`" + (
        " and `image_embeds` float32 `[batch, P]` (un-normalized)" if module.output_image_embeds else ""
    )
    runtime = f"ONNX (opset {opset})" if opset else "`torch.export` program"
    base = metadata["base_model"] or "its base model"
    lines = [
        f"# DPT adapter of `{base}`, exported for serving",
        "",
        f"`{model_file}`: a {metadata['dtype']} {runtime} of a Dual-modality Prompt Tuning adapter with its prompts, "
        f"written by dpt_peft {metadata['version']} (`dpt-peft export`). Input `pixel_values` float32 "
        f"`[batch, 3, H, W]`; outputs {outputs}.",
        "",
        f"The {len(module.class_names)} classes are in `{CLASS_NAMES_FILE}`, in the logits' order: "
        + ", ".join(module.class_names[:20])
        + (", ..." if len(module.class_names) > 20 else "")
        + ". They are part of the model (their text features are constants in the file, and the file records them "
        "in its metadata): to serve other classes, export again with `--class_names`.",
        "",
        f"## Preprocessing (`{PROCESSOR_FILE}`)",
        "",
        *[f"{i}. {step}" for i, step in enumerate(preprocessing_steps(processor_config), 1)],
        "",
        "## Run it",
        "",
    ]
    if model_file.endswith(".onnx"):
        lines += [
            "Without torch, transformers or dpt_peft (`pip install onnxruntime numpy pillow`):",
            "",
            "```bash",
            "python examples/serve_onnx.py --model_dir THIS_FOLDER image.jpg ...   # from dpt_peft's repository",
            "```",
            "",
            "```python",
            "import json, numpy as np, onnxruntime",
            f'session = onnxruntime.InferenceSession("{model_file}")',
            f'names = json.load(open("{CLASS_NAMES_FILE}"))',
            'logits = session.run(["logits"], {"pixel_values": pixel_values})[0]  # preprocessed as above',
            "print([names[i] for i in logits.argmax(-1)])",
            "```",
        ]
    else:
        lines += [
            "```python",
            "import json, torch",
            f'model = torch.export.load("{model_file}").module()',
            f'names = json.load(open("{CLASS_NAMES_FILE}"))',
            "logits = model(pixel_values)  # a float32 tensor, preprocessed as above",
            "print([names[i] for i in logits.argmax(-1)])",
            "```",
        ]
    lines += [
        "",
        "## Checked against PyTorch",
        "",
        f"At export, on {num_images} images at batch 1 and {num_images}: the logits differ from the adapter's PyTorch "
        f"forward by at most {difference:.1e} of the logit scale (a cosine similarity; tolerance "
        f"{TOLERANCES[metadata['dtype']]:.0e} for {metadata['dtype']}).",
        "",
    ]
    return "\n".join(lines)


def _package_version() -> str:
    """dpt-peft's version as installed (the package's metadata: no import of dpt_peft/__init__.py from a layer)."""
    try:
        return importlib.metadata.version("dpt-peft")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
