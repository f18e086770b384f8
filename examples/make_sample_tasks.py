"""Write the generated sample data of the summarization and QA examples (deterministic).

    python examples/make_sample_tasks.py

summaries.jsonl: short "news" sentences; the summary is the subject and what happened.
squad.jsonl: SQuAD-format rows (question, context, answers {text, answer_start}); the answer is a
    city, a year or a colour stated in the context.
chat.jsonl: multi-turn conversations (`messages`, some with a system turn) with a unit-conversion
    assistant that answers in one fixed form ("3 km = 3000 m."), follow-ups included.
alpaca.json: an Alpaca-format JSON array (instruction, input, output): label a review's sentiment
    with one word.
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


UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("h", "min", 60),
         ("min", "s", 60), ("l", "ml", 1000), ("cm", "mm", 10), ("day", "h", 24)]
FOLLOW = {"m": ("cm", 100), "g": ("mg", 1000), "min": ("s", 60), "cm": ("mm", 10), "h": ("min", 60),
          "s": ("ms", 1000), "ml": ("ul", 1000), "mm": ("um", 1000)}
ASKS = ["Convert {n} {a} to {b}.", "How many {b} are in {n} {a}?", "{n} {a} in {b}, please.",
        "What is {n} {a} in {b}?"]
GOOD = ["works well", "arrived fresh", "tastes great", "is excellent", "exceeded my hopes"]
BAD = ["broke at once", "arrived stale", "tastes awful", "is a waste", "disappointed me"]
THINGS = ["The kettle", "This coffee", "The lamp", "My new bag", "The bread", "This phone case"]


def chats(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "You convert units. Answer in one line."}] \
            if i % 4 == 0 else []
        a, b, k = rng.choice(UNITS)
        num = rng.randint(2, 12)
        msgs += [{"role": "user", "content": rng.choice(ASKS).format(n=num, a=a, b=b)},
                 {"role": "assistant", "content": f"{num} {a} = {num * k} {b}."}]
        if b in FOLLOW and rng.random() < 0.5:
            c, k2 = FOLLOW[b]
            msgs += [{"role": "user", "content": f"And in {c}?"},
                     {"role": "assistant", "content": f"{num} {a} = {num * k * k2} {c}."}]
        rows.append({"messages": msgs})
    return rows


def alpaca(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        review = f"{rng.choice(THINGS)} {rng.choice(GOOD if positive else BAD)}."
        rows.append({"instruction": "Label the sentiment of this review as positive or negative.",
                     "input": review, "output": "positive" if positive else "negative"})
    return rows


def _write(name: str, rows: list[dict]) -> None:
    with open(OUT / name, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    _write("summaries.jsonl", summaries(240, random.Random(0)))
    _write("squad.jsonl", squad(240, random.Random(1)))
    _write("chat.jsonl", chats(240, random.Random(2)))
    (OUT / "alpaca.json").write_text(json.dumps(alpaca(200, random.Random(3)), indent=1) + "\n")
