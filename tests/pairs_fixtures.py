"""Hand-written question/answer pairs for the validate/split/lineage tests.

Realistic rows like generation writes them: the conversational answers really score Flesch
>= 75 with textstat, no two questions are near duplicates under MiniLM (max cosine ~0.46), and
each answer is faithful to its factual answer (cosine >= 0.69). `BAD_ROWS` are the planted
failures, one per rule; tests assert their scores where the rule is numeric, so a change in
textstat or the embedder shows up as a fixture failure, not a silent pass.
"""

from __future__ import annotations

import pandas as pd

COLUMNS = ["id", "source_id", "title", "question", "answer", "factual_answer", "flesch", "faithfulness", "attempts"]

CLEAN_ROWS = [
    ("Eiffel Tower", "How tall is the Eiffel Tower?",
     "It's about 330 meters tall. That's as high as an 81 story building! For 41 years it was the tallest thing people had built.",
     "The Eiffel Tower is 330 metres tall, about the height of an 81-storey building, and was the tallest man-made structure in the world for 41 years."),
    ("Honey bee", "Why do bees dance in the hive?",
     "Bees dance to tell the others where food is. The way they wiggle shows which way to fly. How long they dance shows how far it is.",
     "Honey bees perform a waggle dance to communicate the direction and distance of food sources to other members of the colony."),
    ("Mount Everest", "Which country is Mount Everest in?",
     "It sits right on the border of Nepal and China. So it's in both! Climbers can start from either side.",
     "Mount Everest lies on the border between Nepal and the Tibet Autonomous Region of China, and can be climbed from either side."),
    ("Photosynthesis", "What do plants need to make their own food?",
     "Plants need light, water, and air. They take in sunlight with their leaves. Then they turn it into sugar they can use to grow.",
     "Through photosynthesis, plants use sunlight, water and carbon dioxide to produce glucose, which fuels their growth."),
    ("Great Wall of China", "How long is the Great Wall of China?",
     "The Great Wall is really long. If you count all its parts, it runs for over 21,000 kilometers. It was built to keep out raiders.",
     "The Great Wall of China, including all its branches, is more than 21,000 kilometres long and was built as a defence against raiders."),
    ("Octopus", "How many hearts does an octopus have?",
     "An octopus has three hearts. Two pump blood to the gills. The third one sends it to the rest of the body.",
     "Octopuses have three hearts: two branchial hearts pump blood through the gills, while a systemic heart circulates it through the body."),
    ("Moon", "Why does the Moon change shape in the sky?",
     "It doesn't really change shape. We just see more or less of its sunny side as it goes around us. That's what makes the phases.",
     "The Moon's phases result from the changing portion of its sunlit hemisphere visible from Earth as it orbits the planet."),
    ("Chess", "Where did the game of chess come from?",
     "Chess started in India about 1,500 years ago. From there it spread to Persia. Then it made its way to Europe.",
     "Chess originated in India around the 6th century, spread to Persia, and later reached Europe through the Muslim world."),
    ("Volcano", "What makes a volcano erupt?",
     "A volcano erupts when hot melted rock from deep down fills up with gas. The push builds and builds. Then the magma bursts out the top!",
     "Volcanoes erupt when magma, molten rock containing dissolved gases, builds up enough pressure beneath the surface to force its way out."),
    ("Penguin", "Can penguins fly?",
     "No, penguins can't fly. But they are great swimmers! Their wings work like flippers to zip through the water.",
     "Penguins are flightless birds; their wings have evolved into flippers that make them excellent swimmers."),
]

# A clean row on a new topic, the base of most planted rows (Flesch 99.7, faithfulness 0.72).
SPARE_ROW = {
    "title": "Sky",
    "question": "Why is the sky blue on a clear day?",
    "answer": "Sunlight has all the colors in it. The air scatters blue light the most. So blue is what we see all around us.",
    "factual_answer": "Rayleigh scattering by air molecules scatters short blue wavelengths of sunlight more than other colours.",
}
# textstat 0.7.13 scores this 74.805: just under the paper's gate of 75.
FLESCH_JUST_BELOW_75 = (
    "The story goes that a goat herder in Ethiopia saw his goats get lively after they ate some "
    "red berries. Those were coffee beans!"
)
# ...and it is otherwise a good row (new topic, faithfulness 0.71).
FLESCH_ROW = {
    "title": "Coffee",
    "question": "Who first found out that coffee gives you energy?",
    "answer": FLESCH_JUST_BELOW_75,
    "factual_answer": "According to legend, an Ethiopian goatherd named Kaldi discovered coffee after noticing "
    "his goats became energetic after eating coffee berries.",
}
# A paraphrase of CLEAN_ROWS[0]'s question (MiniLM cosine 0.977, far above 0.8).
PARAPHRASED_EIFFEL_QUESTION = "What is the height of the Eiffel Tower?"


def clean_pairs(rows: list[tuple[str, str, str, str]] = CLEAN_ROWS) -> pd.DataFrame:
    """A pairs.parquet-shaped frame (all generate columns) that passes the gate."""
    records = []
    for position, (title, question, answer, factual) in enumerate(rows):
        records.append({
            "id": f"pair-{position:03d}",
            "source_id": f"section-{position:03d}",
            "title": title,
            "question": question,
            "answer": answer,
            "factual_answer": factual,
            "flesch": 90.0,        # the gate must not trust these two: it recomputes them
            "faithfulness": 0.9,
            "attempts": 1,
        })
    return pd.DataFrame(records, columns=COLUMNS)


def with_row(frame: pd.DataFrame, **values) -> pd.DataFrame:
    """`frame` plus one more row: SPARE_ROW (a clean row, id `planted`) updated with `values`."""
    row = {"id": "planted", "source_id": "section-planted", "flesch": 90.0, "faithfulness": 0.9,
           "attempts": 1} | SPARE_ROW | values
    return pd.concat([frame, pd.DataFrame([row], columns=frame.columns)], ignore_index=True)


def many_pairs(count: int) -> pd.DataFrame:
    """`count` distinct rows for split tests (ids unique; text reused, which split ignores)."""
    base = clean_pairs()
    frame = pd.concat([base] * (count // len(base) + 1), ignore_index=True).head(count).copy()
    frame["id"] = [f"pair-{position:05d}" for position in range(count)]
    return frame
