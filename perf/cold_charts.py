"""PNG charts of a cold-start report (matplotlib, no display needed):

- `ready`: time to READY per image and mode, one panel per link; bars are medians,
  whiskers the spread (min to max), the dashed line each image's physical limit;
- `phases`: the median phases of each image and mode stacked in the order they happen.
"""

from pathlib import Path

from perf.cold_modes import PHASES

COLORS = {"full-overlayfs": "#7f7f7f", "stargz-noopt": "#ff9896", "stargz-opt": "#d62728",
          "lazy": "#aec7e8", "lazy-prefetch": "#1f77b4", "lazy-warm-set": "#2ca02c",
          "lazy-nobg": "#c5b0d5", "lazy-prefetch-nobg": "#9467bd", "local-cold": "#000000",
          "local-warm": "#555555", "lazy-prefetch-second": "#98df8a"}
PHASE_COLORS = ("#c7c7c7", "#ffbb78", "#ff7f0e", "#8c564b", "#17becf", "#1f77b4")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ready_chart(results: dict[str, dict], path: Path, title: str) -> Path:
    plt = _pyplot()
    links = list(results)
    fig, axes = plt.subplots(1, len(links), figsize=(6.5 * len(links), 4.8), squeeze=False)
    for ax, link in zip(axes[0], links, strict=True):
        by_image = results[link]
        images = list(by_image)
        modes = list(dict.fromkeys(m for entry in by_image.values() for m in entry["modes"]))
        width = 0.8 / max(1, len(modes))
        for i, mode in enumerate(modes):
            xs, heights, low, high = [], [], [], []
            for j, image in enumerate(images):
                s = by_image[image]["modes"].get(mode)
                if s is None or s["median_ready_s"] is None:
                    continue
                xs.append(j - 0.4 + width * (i + 0.5))
                heights.append(s["median_ready_s"])
                low.append(s["median_ready_s"] - s["min_ready_s"])
                high.append(s["max_ready_s"] - s["median_ready_s"])
            ax.bar(xs, heights, width, yerr=[low, high], capsize=2, label=mode,
                   color=COLORS.get(mode))
        for j, image in enumerate(images):
            limit = by_image[image]["limit"]["limit_s"]
            if limit is not None:
                ax.hlines(limit, j - 0.45, j + 0.45, colors="black", linestyles="dashed",
                          linewidth=1)
        ax.set_xticks(range(len(images)), images)
        ax.set_ylabel("seconds to READY (median; whiskers min-max)")
        ax.set_title(link)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} (dashed: physical limit)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def phases_chart(results: dict[str, dict], path: Path, title: str) -> Path:
    plt = _pyplot()
    rows = [(link, image, mode, s["median_phases_s"])
            for link, by_image in results.items() for image, entry in by_image.items()
            for mode, s in entry["modes"].items()]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.6))
    labels = [f"{link} {image} {mode}" for link, image, mode, _ in rows]
    left = [0.0] * len(rows)
    for phase, color in zip(PHASES, PHASE_COLORS, strict=True):
        widths = [max(0.0, (phases.get(phase) or 0.0)) for *_, phases in rows]
        if any(widths):
            ax.barh(range(len(rows)), widths, left=left, color=color, label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median of each phase)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
