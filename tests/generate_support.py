"""Shared helpers for the generate tests: tiny sections, tiny recordings, the real embedder.

Only the LLM API is faked (tests/fakes/openai_server.py); embeddings are the real packaged
MiniLM, loaded once per session.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.config import CLIENT_KEYS, ClientConfig, GenerateConfig
from pipeline.generate.engine import Section

API_KEY = "sk-" + "test-DO-NOT-LEAK-7f3a9c"  # a sentinel, split so secret scanners do not flag it
KEY_ENV = "TONETUNE_TEST_LLM_KEY"

# Simple, distinct facts: the fake generator turns each into a question naming the title and an
# answer (the first sentence) that is easy to read, so the happy path accepts them.
TOPICS = [
    ("Cats", "Cats are small pets that like to nap in the sun all day."),
    ("Volcanoes", "A volcano is a hill of rock where hot melted stone comes up from deep below."),
    ("Jazz", "Jazz is a kind of music that was born in New Orleans and loves to make things up."),
    ("Bread", "Bread is made from flour, water and yeast, and it puffs up when you bake it."),
    ("Chess", "Chess is a board game for two where each side tries to trap the other king."),
    ("Rain", "Rain falls when tiny drops in a cloud join up and get too heavy to float."),
    ("Trains", "A train is a long line of cars that rolls on metal tracks from town to town."),
    ("Honey bees", "Honey bees live in big groups and make honey from the sweet juice of flowers."),
    ("Glaciers", "A glacier is a huge slow river of ice that creeps down a mountain valley."),
    ("Tea", "Tea is a hot drink made by soaking dried leaves in boiling water."),
    ("Penguins", "Penguins are birds that can not fly, but they swim very well in cold seas."),
    ("Bicycles", "A bike has two wheels, and you push the pedals to make it go."),
    ("Deserts", "A desert is a dry place that gets very little rain in a whole year."),
    ("Mushrooms", "Mushrooms are not plants; they grow from tiny threads hidden in the soil."),
    ("Lighthouses", "A lighthouse is a tall tower with a bright lamp that warns ships at night."),
    ("Kites", "A kite is a light frame of sticks and cloth that the wind lifts into the sky."),
    ("Coral reefs", "Coral reefs are built by tiny sea animals that live in warm, clear water."),
    ("Pianos", "A piano makes sound when small felt hammers hit strings inside the case."),
    ("Owls", "Owls hunt at night and can turn their heads almost all the way around."),
    ("Soap", "Soap grabs both grease and water, so it can wash dirt off your hands."),
    ("Maps", "A map is a flat picture of a place that shows where roads and towns are."),
    ("Snow", "Snow is made of ice crystals that form in cold clouds and fall to the ground."),
    ("Cheese", "Cheese is made when milk is curdled, pressed and left to age for a while."),
    ("Rockets", "A rocket flies by pushing hot gas out of its back very, very fast."),
    ("Tides", "Tides are the slow rise and fall of the sea, pulled by the moon."),
    ("Spiders", "Spiders have eight legs and many of them spin silk webs to catch bugs."),
    ("Clocks", "A clock keeps time with a steady beat, like a swinging weight or a tiny crystal."),
    ("Rice", "Rice is a grain that grows in wet fields and feeds half the people on Earth."),
    ("Whales", "Whales are huge sea mammals that come up to the top of the water to breathe."),
    ("Paper", "Paper is made from wood pulp that is pressed flat into thin sheets and dried."),
    ("Thunder", "Thunder is the loud boom made by air that lightning heats up in a flash."),
    ("Camels", "Camels can walk a long way in the desert without a drink of water."),
    ("Bridges", "A bridge lets people and cars cross a river or a deep valley."),
    ("Salt", "Salt comes from the sea or from mines, and we use it to flavor food."),
    ("Frogs", "Frogs start life as tadpoles in ponds and later grow legs to hop on land."),
    ("Windmills", "A windmill uses the push of the wind on its sails to grind grain or make power."),
    ("Candles", "A candle is a stick of wax with a string in the middle that burns slowly."),
    ("Oak trees", "Oak trees grow acorns and can live for hundreds of years."),
    ("Telescopes", "A telescope uses lenses or mirrors to make far away stars look closer."),
    ("Chocolate", "Chocolate is made from the roasted seeds of the cacao tree."),
]


def topic_sections(count: int | None = None) -> list[Section]:
    """Sections in order, ids s000, s001, ..."""
    topics = TOPICS if count is None else TOPICS[:count]
    return [Section(i, f"s{i:03d}", title, text) for i, (title, text) in enumerate(topics)]


def write_sections(path: Path, sections: list[Section]) -> Path:
    frame = pd.DataFrame([{"id": s.source_id, "title": s.title, "text": s.text} for s in sections])
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def write_recordings(directory: Path, records: list[dict], name: str = "part-1.jsonl") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return directory


def generate_config(**overrides) -> GenerateConfig:
    """Fast settings for tests: tiny backoffs and timeouts, small target. Client keys
    (concurrency, max_retries, prices, ...) go to `client`, the rest to the section."""
    values = dict(backend="openai", model="fake-model", target_pairs=100, temperature=1.0, seed=7)
    client = dict(base_url=None, api_key_env=KEY_ENV, concurrency=4, max_retries=3, backoff_base_s=0.01,
                  backoff_max_s=0.05, request_timeout_s=5.0, prices={}, max_cost_usd=None, allow_unpriced=True)
    for key, value in overrides.items():
        (client if key in CLIENT_KEYS else values)[key] = value
    return GenerateConfig(**values, client=ClientConfig(**client))


def client_params(section: str, **overrides) -> dict:
    """The repo params.yaml's `<section>.client` mapping with `overrides` (for write_params, which
    replaces a section's `client` mapping as a whole)."""
    import yaml

    from tests.conftest import REPO_ROOT

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    return {**params[section]["client"], **overrides}


def run(config, backend, cache, embedder, sections):
    """One engine run (no progress bar)."""
    from pipeline.generate.__main__ import run_engine

    return asyncio.run(run_engine(config, backend, cache, embedder, sections, show_progress=False))


def openai_backend(server, config: GenerateConfig):
    from pipeline.core.llmclient import OpenAIBackend

    return OpenAIBackend(server.base_url, API_KEY, config.client.concurrency, config.client.request_timeout_s)


@pytest.fixture(scope="session")
def embedder():
    """The real packaged MiniLM (loaded once; ~7 s on an idle 2-core machine)."""
    from pipeline.core.config import EmbeddingsConfig
    from pipeline.core.textmetrics import load_embedder

    return load_embedder(EmbeddingsConfig())
