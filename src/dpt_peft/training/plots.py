"""Figures people would rather look at than JSON: the training curve."""

from __future__ import annotations


def plot_training_curve(history: list[dict], path: str) -> None:
    """Loss and training accuracy per epoch; the general-knowledge-guidance epochs are shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    figure, loss_axis = plt.subplots(figsize=(6, 3.5))
    loss_axis.plot(epochs, [h["loss"] for h in history], color="tab:red", label="loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:red")
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.plot(epochs, [100 * h["train_accuracy"] for h in history], color="tab:blue", label="accuracy")
    accuracy_axis.set_ylabel("training accuracy (%)", color="tab:blue")
    accuracy_axis.set_ylim(0, 100)
    guided = [h["epoch"] + 1 for h in history if h["guidance"]]
    if guided:
        loss_axis.axvspan(min(guided) - 0.5, max(guided) + 0.5, color="0.9", zorder=0, label="guidance")
    figure.suptitle("DPT training (shaded: general-knowledge guidance epochs)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
