"""The text side of the corpus: sentences for the speaking channel and words for the listening channel.

The LSLM's speaking channel learns to *say* sentences, so they must be varied (questions, statements,
numbers, names, places, everyday topics) yet short enough (3-15 words) to train on a CPU. They come
from templates x vocabulary, drawn by a seeded generator so the same seed always gives the same list.

The listening channel learns *which* sounds are interruptions: command words (the paper's command-based
setting uses one wake/stop word, "Honey"), any short interruption word (its voice-based setting), and
back-channel words ("uh-huh", "yeah") that a listener says without wanting the floor: those must NOT
count as interruptions. Sentences never contain a command word, so babble made from them (noise) can
never carry one.
"""

from __future__ import annotations

import random
import re

COMMAND_WORDS: tuple[str, ...] = ("Honey", "Stop", "Wait")
MAIN_COMMAND = "Honey"

INTERRUPTION_WORDS: tuple[str, ...] = (
    "no", "hey", "okay", "what", "listen", "excuse me", "hold on", "sorry", "actually", "but",
    "well", "please", "enough", "quiet", "pause", "hello", "hi", "look", "one moment", "one second",
    "sorry to interrupt", "can I say something", "let me speak", "never mind", "forget it", "nope",
    "no no no", "hang on", "just a second", "question", "go back", "repeat that", "again", "louder",
    "slower", "cancel", "thanks", "that's enough", "I disagree", "really",
)

BACKCHANNEL_WORDS: tuple[str, ...] = ("uh-huh", "yeah", "mm-hmm", "right", "hmm", "I see", "sure", "oh")

# How each engine should pronounce a word whose spelling it reads letter by letter ("mm-hmm" -> "M M
# H M M"). The double brackets are raw phoneme input: espeak-ng mnemonics, Piper IPA.
ESPEAK_SAY: dict[str, str] = {"mm-hmm": "[[m'hm]]"}
PIPER_SAY: dict[str, str] = {"mm-hmm": "[[mhˈm]]"}

_V: dict[str, tuple[str, ...]] = {
    "name": ("Anna", "Ben", "Carla", "David", "Elena", "Frank", "Grace", "Henry", "Isabel", "Jack",
             "Karen", "Leo", "Maria", "Nathan", "Olivia", "Peter", "Rachel", "Sam", "Tina", "Victor",
             "Wendy", "Yusuf", "Zoe", "Oscar", "Lucy", "Martin", "Nora", "Paul", "Sophie", "Tom"),
    "city": ("Paris", "London", "Tokyo", "Berlin", "Chicago", "Madrid", "Boston", "Sydney", "Toronto",
             "Rome", "Dublin", "Seattle", "Denver", "Lisbon", "Vienna", "Oslo", "Prague", "Austin",
             "Cairo", "Mumbai", "Seoul", "Athens", "Miami", "Portland"),
    "location": ("the park", "the library", "the station", "the office", "the beach", "the market",
                 "the museum", "the garden", "the kitchen", "the airport", "the gym", "the school",
                 "the hospital", "the bakery", "the bank", "the cinema", "the hotel", "the lake"),
    "food": ("pasta", "soup", "rice", "bread", "salad", "pizza", "noodles", "cheese", "apples",
             "cookies", "fish", "eggs", "pancakes", "tomatoes", "potatoes", "chocolate", "oranges"),
    "drink": ("coffee", "tea", "water", "juice", "milk", "lemonade", "hot chocolate"),
    "object": ("keys", "phone", "umbrella", "laptop", "wallet", "glasses", "bag", "book", "jacket",
               "camera", "ticket", "notebook", "bicycle", "lamp", "chair", "clock", "map", "letter"),
    "animal": ("dog", "cat", "horse", "rabbit", "bird", "fox", "turtle", "goat", "duck", "whale"),
    "color": ("red", "blue", "green", "yellow", "black", "white", "purple", "orange", "gray", "brown"),
    "adj": ("quiet", "busy", "warm", "cold", "bright", "small", "large", "old", "new", "clean",
            "noisy", "friendly", "strange", "beautiful", "simple", "expensive", "cheap", "crowded"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "when": ("tomorrow", "today", "tonight", "next week", "this weekend", "on Monday", "on Friday",
             "after lunch", "in the morning", "this evening", "next month", "on Sunday"),
    "month": ("January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"),
    "activity": ("reading", "cooking", "running", "swimming", "painting", "singing", "dancing",
                 "walking", "writing", "gardening", "traveling", "studying", "cycling", "fishing"),
    "verb": ("call", "visit", "help", "meet", "find", "bring", "clean", "fix", "buy", "read", "watch",
             "cook", "check", "send", "open", "move", "carry", "paint"),
    "job": ("teacher", "doctor", "nurse", "driver", "farmer", "engineer", "baker", "pilot", "artist",
            "writer", "lawyer", "chef", "student", "musician"),
    "relative": ("mother", "father", "sister", "brother", "aunt", "uncle", "cousin", "grandmother",
                 "neighbor", "friend"),
    "weather": ("sunny", "rainy", "windy", "cloudy", "foggy", "snowy", "hot", "chilly"),
    "topic": ("history", "music", "science", "football", "cooking", "politics", "the weather",
              "space travel", "old movies", "gardening", "the news", "computers", "art"),
    "vehicle": ("bus", "train", "car", "boat", "plane", "taxi", "bike"),
    "hour": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"),
}

_TEMPLATES: tuple[str, ...] = (
    "{name} is going to {city} on {day}.",
    "Where is {name}?",
    "I love {food}.",
    "Call me {when}.",
    "{name} is a {job}.",
    "Good morning, {name}.",
    "Is this your {object}?",
    "The {object} is {color}.",
    "See you {when}, {name}.",
    "Nice to meet you, {name}.",
    "After we finish {activity}, {name} and I will take the {vehicle} to {location} for {food}.",
    "When I was a child in {city}, my {relative} used to take me {activity} every {day}.",
    "If the weather is {weather} {when}, we could go {activity} near {location} with {name}.",
    "{name} told me that the {job} from {city} lost a {color} {object} on the {vehicle}.",
    "Before you leave for {city}, please remember to {verb} the {object} and feed the {animal}.",
    "Have you seen my {object}?",
    "The {animal} is sleeping near {location}.",
    "I would like a cup of {drink}, please.",
    "We had {food} for dinner last night.",
    "My {relative} works as a {job} in {city}.",
    "Could you {verb} the {object} before {day}?",
    "It was very {weather} in {city} yesterday.",
    "The train to {city} leaves at {hour} o'clock.",
    "{name} bought {number} {food} at {location}.",
    "Why is {location} so {adj} today?",
    "Do you know where {name} left the {object}?",
    "There are {number} people waiting at {location}.",
    "I think the {color} {object} belongs to {name}.",
    "My favorite hobby is {activity}.",
    "{name} and {name2} met at {location} in {month}.",
    "Please {verb} me when you get to {city}.",
    "Is it going to be {weather} {when}?",
    "The {adj} {animal} ran across {location}.",
    "I need to {verb} my {relative} {when}.",
    "What time does {location} close on {day}?",
    "Our flight to {city} was {number} minutes late.",
    "{name} talked about {topic} for an hour.",
    "Can you tell me more about {topic}?",
    "The {job} said the {object} is broken.",
    "Let's take the {vehicle} to {location}.",
    "I left my {color} {object} on the {vehicle}.",
    "How many {food} do we need for the party?",
    "My {relative} loves {activity} in {month}.",
    "The room number is {number}.",
    "{name} has lived in {city} for {number} years.",
    "Where did you buy that {adj} {object}?",
    "We should go {activity} this weekend.",
    "The {drink} at {location} is really good.",
    "I forgot to {verb} the {object} again.",
    "{name} is learning about {topic} at school.",
    "It takes {number} minutes to walk to {location}.",
    "Who is the new {job} at {location}?",
    "The {animal} in the picture looks {adj}.",
    "Would you rather live in {city} or {city2}?",
    "I usually drink {drink} in the morning.",
    "Remember to bring your {object} {when}.",
    "The {vehicle} was full of {adj} travelers.",
    "{name} painted the fence {color} last {month}.",
    "Is {name} a {job} or a {job2}?",
    "That was the most {adj} day of the year.",
    "Honestly, I prefer {food} to {food2}.",
    "The meeting about {topic} starts at {hour} {when}.",
    "My {relative} gave me a {color} {object} for my birthday.",
    "We walked along {location} until it got dark.",
    "Did {name} really move to {city} in {month}?",
    "The recipe needs {number} eggs and some {food}.",
    "She said the weather in {city} is usually {weather}.",
    "I have never tried {activity} before.",
    "Turn left after {location} and keep going.",
    "The price went up by {number} percent.",
    "Could we meet at {location} around {hour} {when}?",
    "{name} found a small {animal} in the garden.",
    "The {adj} streets of {city} were full of music.",
    "Thank you for helping me {verb} the {object}.",
    "What do you think about {topic}?",
    "Every {day} we go {activity} together.",
    "The {job} from {city} arrived early.",
    "There is a {color} {vehicle} parked outside.",
    "I can't believe it's already {month}.",
)

_SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SLOT = re.compile(r"\{(\w+)\}")
_FORBIDDEN = re.compile(r"\b(" + "|".join(re.escape(w.lower()) for w in COMMAND_WORDS) + r")\b")


def number_words(n: int) -> str:
    """0..999 in words ("one hundred and twenty three"): spoken numbers, not digits, so ASR scoring
    (WER) of the generated speech compares like with like."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words supports 0..999, got {n}")
    if n < 20:
        return _SMALL[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _SMALL[n % 10])
    rest = n % 100
    return _SMALL[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def _fill(template: str, rng: random.Random) -> str:
    used: dict[str, str] = {}

    def pick(match: re.Match[str]) -> str:
        slot = match.group(1)
        if slot == "number":
            return number_words(rng.choice((rng.randint(2, 20), rng.randint(21, 999))))
        base = slot.rstrip("2")
        choices = [v for v in _V[base] if v != used.get(base)]  # {name} and {name2} differ
        value = rng.choice(choices)
        used[base] = value
        return value

    text = _SLOT.sub(pick, template)
    return text[0].upper() + text[1:]


def word_count(text: str) -> int:
    return len(text.split())


def generate_sentences(n: int, seed: int = 0, min_words: int = 3, max_words: int = 15) -> list[str]:
    """`n` distinct sentences, deterministic from `seed`, in a seeded random order. None contains a
    command word. Raises ValueError if the templates cannot give `n` distinct sentences."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(f"sentences-{seed}")
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could only make {len(out)} distinct sentences, asked for {n}")
        text = _fill(rng.choice(_TEMPLATES), rng)
        if text in seen or not min_words <= word_count(text) <= max_words:
            continue
        if _FORBIDDEN.search(text.lower()):
            continue
        seen.add(text)
        out.append(text)
    return out


def listen_vocabulary() -> dict[str, tuple[str, ...]]:
    """The listening channel's words by kind: "command", "word" (any short interruption) and
    "backchannel" (not an interruption)."""
    return {"command": COMMAND_WORDS, "word": INTERRUPTION_WORDS, "backchannel": BACKCHANNEL_WORDS}
