"""The trivial baselines of the multimodal test split: per domain, the accuracy of always giving
the training split's most frequent answer to that domain (and, for questions whose answer
depends on the wording, the most frequent answer to the same question text).

    python scripts/multimodal_baselines.py --domains fashion digits textile grid arithmetic
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from lightning_moe.data.llava import PLACEHOLDERS
from lightning_moe.data.visual_instructions import VisualInstructionDataModule
from lightning_moe.tasks.reasoning.answer_match import normalize_answer


def question_and_answer(conversation) -> tuple[str, str]:
    question = next(text for role, text in conversation.turns if role == "human")
    for placeholder in PLACEHOLDERS.values():
        question = question.replace(placeholder, "")
    return question.strip(), normalize_answer(conversation.turns[-1][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--domains", nargs="+", default=["fashion", "digits", "textile", "grid", "arithmetic"]
    )
    parser.add_argument("--per-domain", type=int, default=500)
    parser.add_argument("--test-per-domain", type=int, default=50)
    arguments = parser.parse_args()
    data = VisualInstructionDataModule(
        domains=arguments.domains, per_domain=arguments.per_domain, test_per_domain=arguments.test_per_domain
    )
    by_domain, by_question = defaultdict(Counter), defaultdict(Counter)
    for conversation in data.conversations("train"):
        question, answer = question_and_answer(conversation)
        by_domain[conversation.domain][answer] += 1
        by_question[question][answer] += 1
    hits = defaultdict(lambda: [0, 0, 0])  # domain -> [majority hits, per-question hits, count]
    for conversation in data.conversations("test"):
        question, answer = question_and_answer(conversation)
        counts = hits[conversation.domain]
        counts[0] += by_domain[conversation.domain].most_common(1)[0][0] == answer
        seen = by_question.get(question)
        counts[1] += bool(seen) and seen.most_common(1)[0][0] == answer
        counts[2] += 1
    print("| domain | majority answer (%) | majority answer per question text (%) |")
    print("|---|---:|---:|")
    for domain in arguments.domains:
        majority, per_question, count = hits[domain]
        print(f"| {domain} | {100 * majority / count:.0f} | {100 * per_question / count:.0f} |")


if __name__ == "__main__":
    main()
