"""What a concept judge sees in generated images, against what their prompts asked for.

- Single images (`ConceptPromptDataModule`): the judge names the object and the styles of the
  whole image.
- Two-slot canvases (`CanvasPromptDataModule`): the judge names the object of each slot's crop
  (configs/judges/canvas_judge.yaml trains it with a frame on half of its images, so a crop's
  part of the frame does not mislead it). A crop with almost no ink holds nothing, whatever the
  judge would call it. The frame is read off the border ring (`shows_frame`), which is where the
  framed LoRA's concept lives.

An image shows all its concepts (`all_present`) when every concept a LoRA stands for is where the
prompt put it; the objects that only fill a free slot are recorded but do not count.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor

from lightning_moe.data.canvas import SLOTS, CanvasPromptDataModule, shows_frame, slot_crops
from lightning_moe.data.concept_prompts import ConceptPromptDataModule
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.diffusion.concept_judge import ConceptJudge

EMPTY = "nothing"
# a slot holds an object only if this share of its pixels is brighter than INK_LEVEL: the 1st
# percentile of real 24 px tiles is 7.6 % or more for each source (scripts/canvas_table.py)
INK_LEVEL = -0.5
MIN_INK = 0.03
CANVAS_STYLE_CHECKS = {"framed": shows_frame}


def check_judge_knows(judge: ConceptJudge, data: L.LightningDataModule | None, path: str) -> None:
    """Every object and style the prompts name must be one the judge can see."""
    if isinstance(data, CanvasPromptDataModule):
        wanted = [name for item in data.prompts for name in item["slots"].values()]
    elif isinstance(data, ConceptPromptDataModule):
        wanted = [concept for item in data.prompts for concept in [item["object"], *item["styles"]]]
    else:
        raise UserInputError(
            "judging concepts needs prompts that say which concepts to expect: use "
            "lightning_moe.data.concept_prompts.ConceptPromptDataModule or "
            "lightning_moe.data.canvas.CanvasPromptDataModule, or judge_path: null"
        )
    known = set(judge.object_names + judge.style_names)
    unknown = [concept for concept in dict.fromkeys(wanted) if concept not in known]
    if unknown:
        raise UserInputError(
            f"the concept judge in {path} cannot judge {unknown[0]!r}; it knows the objects "
            f"{judge.object_names} and the styles {judge.style_names}"
        )


def judged_records(judge: ConceptJudge, images: Tensor, batch: dict) -> list[dict[str, Any]]:
    """Per image (pixels in [-1, 1]) of a batch of prompts: what the judge saw and what was asked."""
    if "slots" in batch:
        return canvas_presence(judge, images, batch["slots"], batch["styles"], batch["layout"])
    verdicts = judge.judge(images)
    return [
        concept_presence(judge, verdicts, row, batch["object"][row], batch["styles"][row])
        for row in range(len(images))
    ]


def concept_presence(
    judge: ConceptJudge,
    verdicts: dict[str, Tensor],
    row: int,
    expected_object: str,
    expected_styles: list[str],
) -> dict[str, Any]:
    """What the judge saw on image `row`, and whether each prompted concept is there."""
    seen_object = judge.object_names[int(verdicts["object"][row])]
    seen_styles = [name for name in judge.style_names if verdicts[name][row]]
    found = {"object_present": seen_object == expected_object} | {
        f"{style}_present": style in seen_styles for style in expected_styles
    }
    unprompted = [style for style in seen_styles if style not in expected_styles]
    judged = {"judged_object": seen_object, "judged_styles": seen_styles}
    return judged | found | {"all_present": all(found.values()), "unprompted_style": bool(unprompted)}


def slot_objects(judge: ConceptJudge, canvases: Tensor) -> dict[str, list[str]]:
    """Each slot's object per canvas [B, 1, H, 2H] in [-1, 1], or EMPTY where it has no ink."""
    seen = {}
    for slot, crop in slot_crops(canvases).items():
        objects = judge.judge(crop)["object"].tolist()
        inked = ((crop > INK_LEVEL).flatten(1).float().mean(-1) >= MIN_INK).tolist()
        seen[slot] = [
            judge.object_names[index] if ink else EMPTY for index, ink in zip(objects, inked, strict=True)
        ]
    return seen


def canvas_presence(
    judge: ConceptJudge,
    canvases: Tensor,
    slots: list[dict[str, str]],
    styles: list[list[str]],
    layouts: list[dict[str, str]],
) -> list[dict[str, Any]]:
    """Per canvas: the prompted and the judged object of each slot, the styles seen, whether each
    slot holds its prompted object and each prompted style shows, and whether every LoRA concept
    (the objects and styles in the prompt's layout) is there."""
    seen = slot_objects(judge, canvases)
    seen_styles = {style: check(canvases).tolist() for style, check in CANVAS_STYLE_CHECKS.items()}
    records = []
    for row, (expected, prompted, layout) in enumerate(zip(slots, styles, layouts, strict=True)):
        judged_styles = [style for style, shown in seen_styles.items() if shown[row]]
        found = {f"{slot}_present": seen[slot][row] == expected[slot] for slot in SLOTS}
        found |= {f"{style}_present": style in judged_styles for style in prompted}
        concepts = [found[f"{slot}_present"] for slot in SLOTS if expected[slot] in layout]
        concepts += [found[f"{style}_present"] for style in prompted]
        records.append(
            {
                "slots": expected,
                "judged_slots": {slot: seen[slot][row] for slot in SLOTS},
                "judged_styles": judged_styles,
            }
            | found
            | {
                "all_present": all(concepts),
                "unprompted_style": any(style not in prompted for style in judged_styles),
            }
        )
    return records
