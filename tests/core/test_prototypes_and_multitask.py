"""SPT prototype initialization and MVLPT multitask prompts (issue 5), against plain re-computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import CLASS_NAMES, save_tiny_clip
from peft import LoraConfig, get_peft_model
from transformers import CLIPModel

from dpt_peft import DPTConfig
from dpt_peft.cli import train_main
from dpt_peft.layer import DPTLayer
from dpt_peft.prototypes import init_visual_prompts_from_prototypes, kmeans_plus_plus_init

SPT = dict(num_visual_tokens=3, visual_depth=2, class_aware=False, num_text_tokens=2)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def layer_input_tokens(clip_path, images) -> list[torch.Tensor]:
    """Patch tokens entering each vision layer of the plain CLIP (hidden_states[l] is layer l's input)."""
    clip = CLIPModel.from_pretrained(clip_path).eval()
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=images, output_hidden_states=True).hidden_states
    return [h[:, 1:].reshape(-1, h.shape[-1]) for h in hidden]


def numpy_lloyd(points: np.ndarray, centres: np.ndarray, iterations: int = 100) -> np.ndarray:
    for _ in range(iterations):
        assignment = ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        updated = np.stack(
            [points[assignment == j].mean(0) if (assignment == j).any() else centres[j] for j in range(len(centres))]
        )
        if np.allclose(updated, centres, atol=0, rtol=0):
            break
        centres = updated
    return centres


def test_kmeans_prototypes_equal_an_independent_kmeans(clip_path, images):
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES, **SPT))
    prompts = init_visual_prompts_from_prototypes(model, [images[:4], images[4:]], method="kmeans")
    assert sorted(prompts) == [0, 1]
    tokens = layer_input_tokens(clip_path, images)
    layers = model.base_model.model.vision_model.encoder.layers
    for index in (0, 1):
        start = kmeans_plus_plus_init(tokens[index], 3, torch.Generator().manual_seed(index)).numpy()
        expected = numpy_lloyd(tokens[index].numpy(), start)
        np.testing.assert_allclose(
            layers[index].dpt_visual_prompts["default"].detach().numpy(), expected, rtol=1e-4, atol=1e-4
        )


def test_random_and_mean_pool_prototypes_come_from_the_tokens(clip_path, images):
    tokens = layer_input_tokens(clip_path, images)
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES, **SPT))
    sampled = init_visual_prompts_from_prototypes(model, [images], method="random")
    for index, prompts in sampled.items():
        assert all(torch.isclose(tokens[index], row, atol=1e-6).all(-1).any() for row in prompts)
    windows = init_visual_prompts_from_prototypes(model, [images], method="mean_pool")
    hidden = [t.view(6, 16, -1) for t in tokens]
    for index, prompts in windows.items():
        means = torch.nn.functional.adaptive_avg_pool1d(hidden[index].transpose(1, 2), 3).transpose(1, 2)
        assert all(torch.isclose(means.reshape(-1, means.shape[-1]), row, atol=1e-5).all(-1).any() for row in prompts)


def test_prototype_memory_is_bounded(clip_path, images):
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES, **SPT))
    from dpt_peft.prototypes import collect_layer_tokens

    layers = list(model.base_model.visual_prompts())
    pools = collect_layer_tokens(
        model, [images[:2], images[2:4], images[4:]], layers, max_images=5, max_tokens_per_layer=20
    )
    assert all(pool.shape == (20, 48) for pool in pools.values())


def test_prototype_errors(clip_path, images):
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES, **{**SPT, "num_visual_tokens": 20})
    )
    with pytest.raises(ValueError, match="collected 16 tokens, fewer than num_visual_tokens=20.*more images"):
        init_visual_prompts_from_prototypes(model, [images[:1]], max_images=1)
    with pytest.raises(ValueError, match="method='median'"):
        init_visual_prompts_from_prototypes(model, [images], method="median")
    coop = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig.for_method("coop", class_names=CLASS_NAMES))
    with pytest.raises(ValueError, match="no deep visual prompts"):
        init_visual_prompts_from_prototypes(coop, [images])


TASKS = {"animals": ["cat", "dog", "bird"], "things": ["car", "tree"]}


def test_tasks_have_their_own_label_spaces(clip_path, pixel_values):
    torch.manual_seed(0)
    multi = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=TASKS, num_text_tokens=2))
    single = get_peft_model(
        CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=TASKS["animals"], num_text_tokens=2)
    )
    shared = {k: v for k, v in multi.state_dict().items() if ".dpt_" in k and ".classifier." not in k}
    single.load_state_dict(shared, strict=False)
    multi.eval(), single.eval()
    with torch.no_grad():
        animals = multi(pixel_values=pixel_values, task="animals")
        things = multi(pixel_values=pixel_values, task="things", labels=torch.tensor([0, 1, 1, 0]))
        alone = single(pixel_values=pixel_values)
    assert animals.logits.shape == (4, 3) and things.logits.shape == (4, 2)
    torch.testing.assert_close(animals.logits, alone.logits)  # the other task's classes change nothing
    assert things.class_aware_logits[0].shape == (4, 2, 2)  # auxiliary logits over the task's own classes
    assert (things.class_aware_indices < 2).all()
    with pytest.raises(ValueError, match=r"Unknown task 'plants'.*\['animals', 'things'\]"):
        multi(pixel_values=pixel_values, task="plants")
    with pytest.raises(ValueError, match="several tasks; pass task="):
        multi(pixel_values=pixel_values)


def test_the_same_class_list_may_serve_two_tasks(clip):
    model = get_peft_model(clip, DPTConfig(class_names={"a": ["cat", "dog"], "b": ["cat", "dog"]}))
    assert model.class_names("a") == model.class_names("b") == ["cat", "dog"]


def save_adapter(clip_path, path, seed, **config):
    torch.manual_seed(seed)
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(num_text_tokens=2, **config))
    model.save_pretrained(path)
    return model


def test_transfer_copies_exactly_the_shared_tensors(clip_path, tmp_path):
    first = save_adapter(clip_path, tmp_path / "a", 1, class_names=TASKS)
    second = save_adapter(clip_path, tmp_path / "b", 2, class_names=TASKS)
    torch.manual_seed(3)
    target = get_peft_model(
        CLIPModel.from_pretrained(clip_path),
        DPTConfig(
            num_text_tokens=2,
            class_names=["fish", "tree", "sea turtle", "x"],
            init_from=[str(tmp_path / "a"), str(tmp_path / "b")],
        ),
    )
    sources = [dict(first.named_parameters()), dict(second.named_parameters())]
    copied = 0
    for name, parameter in target.named_parameters():
        if ".dpt_" not in name:
            continue
        if ".classifier." in name:  # over the source label space: never copied
            assert parameter.shape[0] == 4 and sources[0][name].shape[0] == 5
            continue
        torch.testing.assert_close(parameter, (sources[0][name] + sources[1][name]) / 2)
        copied += 1
    assert copied == 13  # context, 2 x visual prompts, 10 CAVPT tensors (all but the classifier)


def test_transfer_does_not_copy_class_specific_context(clip_path, tmp_path):
    save_adapter(clip_path, tmp_path / "csc", 1, class_names=CLASS_NAMES, class_specific_context=True)
    torch.manual_seed(5)
    target = get_peft_model(
        CLIPModel.from_pretrained(clip_path),
        DPTConfig(
            num_text_tokens=2, class_names=CLASS_NAMES, class_specific_context=True, init_from=str(tmp_path / "csc")
        ),
    )
    torch.manual_seed(5)
    fresh = get_peft_model(
        CLIPModel.from_pretrained(clip_path),
        DPTConfig(num_text_tokens=2, class_names=CLASS_NAMES, class_specific_context=True),
    )
    context = "base_model.model.text_model.embeddings.dpt_context.default"
    assert torch.equal(dict(target.named_parameters())[context], dict(fresh.named_parameters())[context])


def test_transfer_errors(clip_path, tmp_path):
    save_adapter(clip_path, tmp_path / "five", 1, class_names=CLASS_NAMES, num_visual_tokens=5)
    clip = CLIPModel.from_pretrained(clip_path)
    with pytest.raises(ValueError, match="dpt_visual_prompts is \\(5, 48\\) in the source but \\(10, 48\\) here"):
        get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=2, init_from=[str(tmp_path / "five")]))
    assert not any(isinstance(m, DPTLayer) for m in clip.modules())
    with pytest.raises(ValueError, match="cannot read an adapter config from .*missing"):
        get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, init_from=[str(tmp_path / "missing")]))
    get_peft_model(CLIPModel.from_pretrained(clip_path), LoraConfig(target_modules=["q_proj"])).save_pretrained(
        tmp_path / "lora"
    )
    with pytest.raises(ValueError, match="is a LORA adapter, not a DPT adapter"):
        get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, init_from=[str(tmp_path / "lora")]))
    other = CLIPModel.from_pretrained(save_tiny_clip(tmp_path / "wide", vision_width=64))
    wide = get_peft_model(other, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=2))
    wide.save_pretrained(tmp_path / "wide_adapter")
    with pytest.raises(ValueError, match="another width or prompt length"):
        get_peft_model(
            clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=2, init_from=[str(tmp_path / "wide_adapter")])
        )
    assert not any(isinstance(m, DPTLayer) for m in clip.modules())


def test_joint_training_reports_every_task_and_their_mean(tmp_path):
    metrics = train_main(
        [
            "--tasks",
            "toy-position,toy-size",
            "--epochs",
            "2",
            "--shots",
            "4",
            "--report_to",
            "none",
            "--output_dir",
            str(tmp_path),
            "--task_sampling",
            "uniform",
        ]
    )
    assert sorted(metrics["tasks"]) == ["toy-position", "toy-size"]
    assert metrics["accuracy"] == pytest.approx(np.mean([m["accuracy"] for m in metrics["tasks"].values()]))
    assert sorted(metrics["tasks"]["toy-size"]["per_class_accuracy"]) == ["large", "small"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["class_names"]) == ["toy-position", "toy-size"]


def test_prototype_init_flag_runs_before_training(tmp_path):
    metrics = train_main(
        [
            "--epochs",
            "1",
            "--shots",
            "4",
            "--report_to",
            "none",
            "--output_dir",
            str(tmp_path),
            "--visual_prompt_init",
            "prototype",
            "--prototype_method",
            "kmeans",
        ]
    )
    assert metrics["steps"] == 1
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["visual_prompt_init"] == "prototype"


def test_transfer_from_related_toy_tasks_starts_from_a_lower_loss(tmp_path):
    """MVLPT's premise on the embedded toy data: prompts learned on shape and size help to start on position."""
    from torch.utils.data import DataLoader
    from transformers import AutoImageProcessor

    from dpt_peft.data.batching import ImageBatcher
    from dpt_peft.data.datasets import load_task
    from dpt_peft.sources import TOY_CLIP_ID, resolve
    from dpt_peft.training.arguments import TOY_CONFIG_DEFAULTS, TrainArguments

    source = tmp_path / "source"
    train_main(
        [
            "--tasks",
            "toy-shape,toy-size",
            "--epochs",
            "10",
            "--shots",
            "8",
            "--report_to",
            "none",
            "--output_dir",
            str(source),
        ]
    )
    target = load_task(TrainArguments(report_to="none").data_spec, "toy-position")
    path = resolve(TOY_CLIP_ID)
    batch = next(
        iter(
            DataLoader(
                target.train,
                batch_size=len(target.train),
                collate_fn=ImageBatcher(AutoImageProcessor.from_pretrained(path), "image", "label"),
            )
        )
    )
    losses = {}
    for name, init_from in (("random", None), ("transfer", [str(source / "adapter")])):
        torch.manual_seed(0)
        model = get_peft_model(
            CLIPModel.from_pretrained(path),
            DPTConfig(class_names=target.class_names, init_from=init_from, **TOY_CONFIG_DEFAULTS),
        )
        with torch.no_grad():
            losses[name] = model.eval()(**batch).loss.item()
    assert losses["transfer"] < losses["random"], losses
