"""Text-only instructions with one short right answer: arithmetic, word tasks, facts about shapes and colours.

``text_instruction(rng)`` draws one (task, question, answer). The pools are small enough that the same
question comes up more than once; :func:`vision.data.build` puts every distinct question in exactly one
split (by a hash of its text), so the test split asks questions training never saw.
"""

from __future__ import annotations

import random

from vision.data_render import NUMBER_WORDS

OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "open": "closed",
             "happy": "sad", "old": "new", "light": "dark", "wet": "dry", "tall": "short", "full": "empty",
             "left": "right", "black": "white", "early": "late", "hard": "soft", "loud": "quiet", "rich": "poor",
             "strong": "weak", "thick": "thin", "win": "lose", "push": "pull", "in": "out", "yes": "no"}
PLURALS = {"cat": "cats", "box": "boxes", "child": "children", "mouse": "mice", "bus": "buses", "foot": "feet",
           "man": "men", "tooth": "teeth", "city": "cities", "baby": "babies", "leaf": "leaves", "dog": "dogs",
           "house": "houses", "woman": "women", "fish": "fish", "sheep": "sheep", "glass": "glasses", "key": "keys",
           "star": "stars", "circle": "circles", "fox": "foxes", "knife": "knives", "wolf": "wolves"}
WORD_POOL = ("apple", "house", "river", "green", "table", "chair", "tiger", "pencil", "orange", "window", "cloud",
             "garden", "music", "paper", "square", "circle", "yellow", "purple", "triangle", "planet", "bread",
             "water", "stone", "horse", "lemon", "train", "smile", "flower", "candle", "rocket")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
SIDES = {"triangle": 3, "square": 4, "rectangle": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple",
         ("red", "white"): "pink", ("black", "white"): "grey"}
OBJECT_COLOURS = {"banana": "yellow", "grass": "green", "snow": "white", "coal": "black", "a tomato": "red",
                  "the sky on a clear day": "blue", "a lemon": "yellow", "a strawberry": "red", "milk": "white",
                  "a leaf in summer": "green", "a carrot": "orange", "the sea": "blue", "chocolate": "brown",
                  "an orange": "orange", "a crow": "black", "a lime": "green"}
SHAPE_FACTS = [("Which shape has no corners: circle or square?", "circle"),
               ("Which shape has three sides: triangle or square?", "triangle"),
               ("What shape is a ball?", "sphere"), ("What shape is a wheel?", "circle"),
               ("What shape is a pizza slice?", "triangle"), ("Which shape has four equal sides?", "square"),
               ("What shape is a stop sign?", "octagon"), ("What is a six-sided shape called?", "hexagon"),
               ("What is a five-sided shape called?", "pentagon"), ("What shape is a dice?", "cube")]
ONE = "Answer with one word."
NUMBER = "Answer with a number."


def arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-x")
    if op == "+":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"What is {a} + {b}? {NUMBER}", str(a + b)
    if op == "-":
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        return f"What is {a} - {b}? {NUMBER}", str(a - b)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} times {b}? {NUMBER}", str(a * b)


def word_task(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("opposite", "plural", "first", "last", "letters", "next_day", "next_month", "alphabet",
                       "number_word"))
    if kind == "opposite":
        w = rng.choice(list(OPPOSITES))
        return f"What is the opposite of \"{w}\"? {ONE}", OPPOSITES[w]
    if kind == "plural":
        w = rng.choice(list(PLURALS))
        return f"What is the plural of \"{w}\"? {ONE}", PLURALS[w]
    if kind == "first":
        w = rng.choice(WORD_POOL)
        return f"What is the first letter of the word \"{w}\"? Answer with the letter.", w[0]
    if kind == "last":
        w = rng.choice(WORD_POOL)
        return f"What is the last letter of the word \"{w}\"? Answer with the letter.", w[-1]
    if kind == "letters":
        w = rng.choice(WORD_POOL)
        return f"How many letters are in the word \"{w}\"? {NUMBER}", str(len(w))
    if kind == "next_day":
        i = rng.randrange(7)
        return f"What day comes after {DAYS[i]}? {ONE}", DAYS[(i + 1) % 7].lower()
    if kind == "next_month":
        i = rng.randrange(12)
        return f"What month comes after {MONTHS[i]}? {ONE}", MONTHS[(i + 1) % 12].lower()
    if kind == "alphabet":
        a, b = rng.sample(WORD_POOL, 2)
        return f"Which word comes first in alphabetical order: {a} or {b}? {ONE}", min(a, b)
    n = rng.randint(0, 10)
    return f"Write the number {NUMBER_WORDS[n]} as digits. {NUMBER}", str(n)


def fact(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("sides", "corners", "mix", "object", "shape"))
    if kind in ("sides", "corners"):
        s = rng.choice(list(SIDES))
        return f"How many {kind} does a {s} have? {NUMBER}", str(SIDES[s])
    if kind == "mix":
        (a, b), c = rng.choice(list(MIXES.items()))
        if rng.random() < 0.5:
            a, b = b, a
        return f"What colour do you get when you mix {a} and {b}? {ONE}", c
    if kind == "object":
        o = rng.choice(list(OBJECT_COLOURS))
        return f"What colour is {o}? {ONE}", OBJECT_COLOURS[o]
    q, a = rng.choice(SHAPE_FACTS)
    return f"{q} {ONE}", a


TEXT_TASKS = {"arithmetic": arithmetic, "word": word_task, "fact": fact}
TEXT_MIX = {"arithmetic": 0.35, "word": 0.4, "fact": 0.25}


def text_instruction(rng: random.Random) -> tuple[str, str, str]:
    """(task, question, answer)."""
    task = rng.choices(list(TEXT_MIX), weights=list(TEXT_MIX.values()))[0]
    q, a = TEXT_TASKS[task](rng)
    return task, q, a
