"""Write examples/constraints/constraints_v1.jsonl: 100 instruction prompts with verifiable format
constraints (IFEval-style), written for the sft project (same license as the project).

    python examples/constraints/make_data.py

Deterministic: re-running writes the same bytes. Each row is a user instruction whose format
requirements are stated in plain words and repeated as a machine-checkable ``constraints`` list
(``sft.evaluation.constraints``), plus a reference answer that meets every one of them (a test
checks that, so the checkers and the data agree). Score any instruct model with

    sft eval examples/constraints/eval.yaml --model MODEL

20 everyday topics x 5 prompt kinds; each prompt kind mixes one to three constraint types, so
every type is used at least 10 times.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# topic -> (a noun phrase, three short facts, one word to avoid)
TOPICS: dict[str, tuple[str, list[str], str]] = {
    "tea": ("tea", ["tea is made from the leaves of camellia sinensis", "green and black tea come from the same plant",
                    "tea has less caffeine per cup than coffee"], "coffee"),
    "bicycles": ("bicycles", ["a bicycle turns pedal power into motion with a chain", "gears let a rider climb hills",
                              "bicycles need no fuel"], "car"),
    "volcanoes": ("volcanoes", ["a volcano is an opening where molten rock reaches the surface",
                                "lava cools into new rock", "some volcanoes sleep for centuries"], "mountain"),
    "bread": ("bread", ["bread is baked from flour and water", "yeast makes the dough rise",
                        "sourdough uses wild yeast"], "cake"),
    "bees": ("bees", ["bees pollinate many food crops", "a hive can hold tens of thousands of bees",
                      "bees make honey from nectar"], "wasp"),
    "rain": ("rain", ["rain forms when water droplets in clouds grow heavy", "rain refills rivers and lakes",
                      "some deserts see rain only once a year"], "snow"),
    "libraries": ("libraries", ["libraries lend books for free", "many libraries also lend music and films",
                                "librarians help people find information"], "shop"),
    "chess": ("chess", ["chess is played on a board of sixty four squares", "each player starts with sixteen pieces",
                        "the goal is to checkmate the king"], "cards"),
    "the moon": ("the moon", ["the moon orbits the earth about once a month", "its gravity drives the tides",
                              "the same side of the moon always faces us"], "sun"),
    "rivers": ("rivers", ["rivers carry water from high ground to the sea", "rivers shape valleys over time",
                          "many cities grew up beside rivers"], "ocean"),
    "sleep": ("sleep", ["adults need about seven to nine hours of sleep", "sleep helps the brain store memories",
                        "a regular bedtime improves sleep"], "coffee"),
    "maps": ("maps", ["a map shows places from above", "a scale tells how far apart places are",
                      "north is usually at the top of a map"], "phone"),
    "gardening": ("gardening", ["plants need light, water and soil", "compost feeds the soil",
                                "watering in the morning saves water"], "weeds"),
    "recycling": ("recycling", ["recycling turns used materials into new products", "glass can be recycled many times",
                                "sorting waste makes recycling easier"], "landfill"),
    "owls": ("owls", ["owls hunt mostly at night", "soft feathers make their flight silent",
                      "owls can turn their heads very far"], "eagle"),
    "music": ("music", ["music is sound arranged in time", "rhythm gives music its pulse",
                        "people in every culture make music"], "noise"),
    "bridges": ("bridges", ["bridges carry roads over rivers and valleys", "arches spread the load to the ground",
                            "suspension bridges hang from steel cables"], "tunnel"),
    "clouds": ("clouds", ["clouds are made of tiny water droplets or ice", "dark clouds often bring rain",
                          "fog is a cloud near the ground"], "rain"),
    "trains": ("trains", ["trains run on steel rails", "one train can carry hundreds of people",
                          "electric trains draw power from overhead wires"], "plane"),
    "salt": ("salt", ["salt is mostly sodium chloride", "salt keeps food from spoiling",
                      "sea water holds a lot of salt"], "sugar"),
}


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def kinds(topic: str, noun: str, facts: list[str], avoid: str) -> list[tuple[str, list[dict[str, Any]], str]]:
    """The five prompt kinds for one topic: (instruction, constraints, a reply that meets them)."""
    sentence = f"About {noun}: {facts[0]}."
    return [
        (f"In at most 20 words, tell me one fact about {noun}. Use the word \"{topic.split()[-1]}\" and do not "
         f"mention \"{avoid}\".",
         [{"type": "max_words", "n": 20}, {"type": "must_include", "text": topic.split()[-1]},
          {"type": "must_not_include", "text": avoid}],
         sentence),
        (f"List exactly three facts about {noun} as bullet points, each line starting with \"- \". "
         "Do not use any commas.",
         [{"type": "num_bullets", "n": 3}, {"type": "no_commas"}],
         "\n".join(f"- {cap(f).replace(',', '')}." for f in facts)),
        (f"Reply with only a JSON object about {noun} with the keys \"topic\" and \"fact\".",
         [{"type": "json_keys", "keys": ["topic", "fact"]}, {"type": "starts_with", "text": "{"}],
         json.dumps({"topic": noun, "fact": facts[1]})),
        (f"Write two short paragraphs about {noun}, separated by a blank line, in lowercase letters only. "
         "End your answer with the word \"done\".",
         [{"type": "num_paragraphs", "n": 2}, {"type": "lowercase"}, {"type": "ends_with", "text": "done"}],
         f"{facts[0]}. {facts[1]}.\n\n{facts[2]}. done"),
        (f"Answer in one line of capital letters only, starting with \"FACT:\": what is one thing to know about "
         f"{noun}? Use at least 6 words.",
         [{"type": "uppercase"}, {"type": "starts_with", "text": "FACT:"}, {"type": "one_line"},
          {"type": "min_words", "n": 6}],
         f"FACT: {noun.upper()}: {facts[2].upper()}."),
    ]


def make() -> list[dict[str, Any]]:
    rows = []
    for topic, (noun, facts, avoid) in TOPICS.items():
        for prompt, constraints, reply in kinds(topic, noun, facts, avoid):
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                         "constraints": constraints})
    return rows


def main(out_dir: Path | None = None) -> Path:
    out = (out_dir or Path(__file__).resolve().parent) / "constraints_v1.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make()), encoding="utf-8")
    return out


if __name__ == "__main__":
    print(f"wrote {main()}")
