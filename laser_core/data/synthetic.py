"""A built-in synthetic dataset: the embedded default when no data directory is given.

The catalogue has realistic titles, brands and category paths. Users belong to latent types; each type has
its own preferred categories and brands, its own category-to-category transitions, and its own item-level
"what comes next" links (buy a grinder, then its burr set). So the next item depends on the user's type
(visible through the history) and on the last items, and a sequential model beats popularity. Everything is
drawn from one ``numpy`` generator seeded by ``seed``: same config, same dataset, on every machine.
"""

from __future__ import annotations

from dataclasses import asdict

from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass

import numpy as np

from laser_core.data.io import MAX_TIMESTAMP
from laser_core.data.model import SeqDataset, build_items_frame

# top category -> leaf category -> product nouns
TAXONOMY: dict[str, dict[str, list[str]]] = {
    "Home & Kitchen": {
        "Coffee & Tea": ["Burr Coffee Grinder", "French Press", "Pour-Over Kettle", "Tea Infuser", "Espresso Tamper"],
        "Cookware": ["Cast Iron Skillet", "Nonstick Frying Pan", "Dutch Oven", "Saucepan", "Wok"],
        "Cutlery": ["Chef's Knife", "Paring Knife", "Knife Sharpener", "Bread Knife", "Cutting Board"],
        "Storage": ["Glass Food Container Set", "Vacuum Sealer Bags", "Spice Jar Set", "Bread Box"],
    },
    "Sports & Outdoors": {
        "Camping": ["Backpacking Tent", "Sleeping Bag", "Camp Stove", "Headlamp", "Trekking Poles"],
        "Cycling": ["Bike Helmet", "Bike Light Set", "Floor Pump", "Cycling Gloves", "Chain Lube"],
        "Fitness": ["Yoga Mat", "Adjustable Dumbbells", "Resistance Bands", "Foam Roller", "Jump Rope"],
        "Water Sports": ["Swim Goggles", "Snorkel Set", "Dry Bag", "Rash Guard"],
    },
    "Industrial & Scientific": {
        "Lab Supplies": ["Glass Beaker Set", "Digital Pipette", "Nitrile Gloves", "Petri Dishes", "Lab Notebook"],
        "Measuring Tools": ["Digital Caliper", "Laser Distance Meter", "Moisture Meter", "pH Meter"],
        "Abrasives": ["Sanding Roll", "Grinding Wheel", "Flap Disc", "Sanding Sponge"],
        "Fasteners": ["Stainless Wood Screws", "Hex Bolt Assortment", "Galvanized Staples", "Wall Anchors"],
    },
    "Electronics": {
        "Audio": ["Wireless Earbuds", "Bluetooth Speaker", "Studio Headphones", "USB Microphone"],
        "Computer Accessories": ["Mechanical Keyboard", "Wireless Mouse", "USB-C Hub", "Laptop Stand"],
        "Power": ["Power Bank", "USB-C Charger", "Surge Protector", "Rechargeable AA Batteries"],
        "Cameras": ["Action Camera", "Camera Tripod", "SD Memory Card", "Lens Cleaning Kit"],
    },
    "Beauty": {
        "Skin Care": ["Hydrating Face Serum", "Daily Moisturizer", "Mineral Sunscreen", "Gentle Cleanser"],
        "Hair Care": ["Argan Oil Shampoo", "Leave-In Conditioner", "Ionic Hair Dryer", "Wide-Tooth Comb"],
        "Makeup": ["Eyeshadow Palette", "Liquid Eyeliner", "Matte Lipstick", "Makeup Brush Set"],
    },
}

BRAND_SYLLABLES = [
    "Ac",
    "Bel",
    "Cor",
    "Dyn",
    "El",
    "Fer",
    "Gal",
    "Hal",
    "Ion",
    "Jun",
    "Kor",
    "Lum",
    "Mar",
    "Nov",
    "Or",
    "Pel",
    "Quin",
    "Rav",
    "Sol",
    "Tor",
    "Ul",
    "Ver",
    "Wex",
    "Zen",
]
BRAND_ENDINGS = ["ex", "ora", "ix", "ware", "line", "co", "tek", "ford", "a", "on", "ia", "works"]
ADJECTIVES = [
    "Pro",
    "Classic",
    "Compact",
    "Premium",
    "Ultra",
    "Essential",
    "Heavy-Duty",
    "Lightweight",
    "Deluxe",
    "Eco",
    "Travel",
    "Advanced",
    "Everyday",
    "Precision",
]
COLOURS = ["Black", "White", "Silver", "Blue", "Red", "Green", "Graphite", "Sand"]
SIZES = ["Small", "Medium", "Large", "2-Pack", "3-Pack", "12 oz", "500 ml", "10 Inch", "Set of 6"]


#: the leaf categories: every one gets an item, so a catalogue needs at least this many
N_CATEGORIES = sum(len(sub) for sub in TAXONOMY.values())
#: how many distinct brand names :func:`_brands` can make (a syllable, an ending, one of 6 suffixes or none)
MAX_BRANDS = len(BRAND_SYLLABLES) * len(BRAND_ENDINGS) * 7


@dataclass(config=ConfigDict(strict=True))
class SyntheticConfig:
    """The generator's settings (``dataset.synthetic`` of a run config), checked when made: a wrong type or an
    impossible value is a pydantic ``ValidationError`` naming the setting."""

    n_users: int = Field(default=3000, ge=1)
    n_items: int = Field(default=1000, ge=N_CATEGORIES)
    n_user_types: int = Field(default=8, ge=1)
    n_brands: int = Field(default=60, ge=1, le=MAX_BRANDS)
    mean_length: float = Field(default=8.0, gt=0, allow_inf_nan=False)  # mean sequence length (>= min_length)
    min_length: int = Field(default=3, ge=1)
    max_length: int = Field(default=50, ge=1)
    # probability that the next item is a type-specific follow-up of the last item
    p_follow: float = Field(default=0.55, ge=0, le=1)
    p_stay: float = Field(default=0.25, ge=0, le=1)  # otherwise: probability of staying in the last item's category
    seed: int = Field(default=0, ge=0)
    start_time: int = Field(default=1_500_000_000, ge=0, le=MAX_TIMESTAMP // 2)  # Unix seconds

    @field_validator("max_length")
    @classmethod
    def _max_at_least_min(cls, value: int, info: ValidationInfo) -> int:
        if value < info.data.get("min_length", 1):
            raise ValueError(f"must be >= min_length ({info.data['min_length']})")
        return value


def _brands(rng: np.random.Generator, n: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = rng.choice(BRAND_SYLLABLES) + rng.choice(BRAND_ENDINGS)
        if rng.random() < 0.3:
            name += " " + rng.choice(["Labs", "Home", "Outdoor", "Audio", "Tools", "Beauty"])
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def generate_synthetic(config: SyntheticConfig | None = None) -> SeqDataset:
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    leaves = [(top, leaf, nouns) for top, sub in TAXONOMY.items() for leaf, nouns in sub.items()]
    n_cat = len(leaves)
    brands = _brands(rng, cfg.n_brands)
    # each brand sells in a few categories
    brand_cats = [set(rng.choice(n_cat, size=3, replace=False).tolist()) for _ in brands]

    # ---- catalogue
    item_cat = rng.integers(0, n_cat, size=cfg.n_items)
    item_cat[:n_cat] = np.arange(n_cat)  # every category has at least one item
    titles, item_brand, cats, seen_titles = [], [], [], set()
    for i in range(cfg.n_items):
        c = int(item_cat[i])
        top, leaf, nouns = leaves[c]
        options = [b for b in range(len(brands)) if c in brand_cats[b]] or list(range(len(brands)))
        b = int(rng.choice(options))
        while True:
            parts = [brands[b]]
            if rng.random() < 0.7:
                parts.append(str(rng.choice(ADJECTIVES)))
            parts.append(str(rng.choice(nouns)))
            title = " ".join(parts)
            extras = []
            if rng.random() < 0.5:
                extras.append(str(rng.choice(COLOURS)))
            if rng.random() < 0.6:
                extras.append(str(rng.choice(SIZES)))
            if extras:
                title += ", " + ", ".join(extras)
            if rng.random() < 0.3:
                title += f" ({brands[b][:2].upper()}-{rng.integers(100, 9999)})"
            if title not in seen_titles:
                break
        seen_titles.add(title)
        titles.append(title)
        item_brand.append(b)
        cats.append(f"{top} {leaf}")
    item_brand_arr = np.asarray(item_brand)
    popularity = rng.zipf(1.6, size=cfg.n_items).clip(max=200).astype(float)
    by_cat = [np.flatnonzero(item_cat == c) for c in range(n_cat)]

    # ---- latent user types
    T = cfg.n_user_types
    type_cat_pref = np.stack([rng.dirichlet(np.full(n_cat, 0.15)) for _ in range(T)])
    type_brand_pref = np.stack([rng.dirichlet(np.full(len(brands), 0.3)) for _ in range(T)])
    # category transitions: mostly towards the type's own favourites
    type_trans = np.stack(
        [np.stack([rng.dirichlet(0.05 + 4.0 * type_cat_pref[t]) for _ in range(n_cat)]) for t in range(T)]
    )
    # item-level follow-ups: for each type and item, 2 items (usually in a related category)
    follow = np.empty((T, cfg.n_items, 2), dtype=np.int64)
    for t in range(T):
        for i in range(cfg.n_items):
            nxt_cat = rng.choice(n_cat, size=2, p=type_trans[t, item_cat[i]])
            follow[t, i] = [rng.choice(by_cat[c]) for c in nxt_cat]

    def pick_in_category(t: int, c: int) -> int:
        cand = by_cat[c]
        w = popularity[cand] * (0.2 + 50.0 * type_brand_pref[t, item_brand_arr[cand]])
        return int(rng.choice(cand, p=w / w.sum()))

    users, sequences, timestamps = [], [], []
    user_types = rng.integers(0, T, size=cfg.n_users)
    extra_mean = max(cfg.mean_length - cfg.min_length, 0.0)
    for u in range(cfg.n_users):
        t = int(user_types[u])
        length = cfg.min_length + (rng.geometric(1.0 / (extra_mean + 1.0)) - 1 if extra_mean > 0 else 0)
        length = int(min(length, cfg.max_length))
        seq = [pick_in_category(t, int(rng.choice(n_cat, p=type_cat_pref[t])))]
        while len(seq) < length:
            last = seq[-1]
            r = rng.random()
            if r < cfg.p_follow:
                nxt = int(follow[t, last, rng.integers(0, 2)])
            elif r < cfg.p_follow + cfg.p_stay:
                nxt = pick_in_category(t, int(item_cat[last]))
            else:
                nxt = pick_in_category(t, int(rng.choice(n_cat, p=type_trans[t, item_cat[last]])))
            seq.append(nxt)
        start = cfg.start_time + int(rng.integers(0, 2 * 365 * 86400))
        gaps = rng.exponential(5 * 86400, size=length).astype(np.int64)
        users.append(f"u{u:05d}")
        sequences.append(np.asarray(seq, dtype=np.int64))
        timestamps.append(start + np.cumsum(gaps))
    items = build_items_frame([f"i{i:05d}" for i in range(cfg.n_items)], titles, [brands[b] for b in item_brand], cats)
    return SeqDataset(
        name="synthetic",
        items=items,
        users=users,
        sequences=sequences,
        timestamps=timestamps,
        source={"format": "synthetic", **asdict(cfg)},
    )
