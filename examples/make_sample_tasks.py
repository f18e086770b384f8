"""Write the generated sample data of the summarization and QA examples (deterministic).

    python examples/make_sample_tasks.py

summaries.jsonl: short "news" sentences; the summary is the subject and what happened.
squad.jsonl: SQuAD-format rows (question, context, answers {text, answer_start}); the answer is a
    city, a year or a colour stated in the context.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "sample"
PEOPLE = ["the mayor", "a farmer", "the team", "a student", "the council", "a pilot", "the chef",
          "a nurse", "the band", "a teacher"]
EVENTS = ["opened a new bridge", "won the final", "found a lost dog", "planted a garden",
          "wrote a short book", "fixed the old clock", "sold the red car", "built a small boat"]
PLACES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dakar", "Hanoi"]
DAYS = ["on Monday", "last week", "in the morning", "after lunch", "yesterday", "in spring"]
FILLER = ["People came to watch.", "The weather was mild.", "Many photos were taken.",
          "Local papers wrote about it.", "It took a long time.", "Everyone was happy."]
COLOURS = ["red", "blue", "green", "yellow", "white", "black"]


def summaries(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        who, what = rng.choice(PEOPLE), rng.choice(EVENTS)
        text = (f"{rng.choice(DAYS).capitalize()} in {rng.choice(PLACES)}, {who} {what}. "
                + " ".join(rng.sample(FILLER, 2)))
        rows.append({"text": text, "summary": f"{who} {what}"})
    return rows


def squad(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        who, place = rng.choice(PEOPLE), rng.choice(PLACES)
        year, colour = str(rng.randint(1900, 2020)), rng.choice(COLOURS)
        context = (f"In {year}, {who} moved to {place} and painted the house {colour}. "
                   + " ".join(rng.sample(FILLER, 2)))
        question, answer = rng.choice([(f"Where did {who} move?", place),
                                       (f"When did {who} move to {place}?", year),
                                       (f"What colour was the house of {who}?", colour)])
        rows.append({"id": i, "question": question, "context": context,
                     "answers": {"text": [answer], "answer_start": [context.index(answer)]}})
    return rows


def _write(name: str, rows: list[dict]) -> None:
    with open(OUT / name, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    _write("summaries.jsonl", summaries(240, random.Random(0)))
    _write("squad.jsonl", squad(240, random.Random(1)))
