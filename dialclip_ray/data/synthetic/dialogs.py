"""Dialog text for the synthetic corpus: PhotoChat-style dialogs and MMDialog-style conversations.

What makes the retrieval task fair (design.md 3.4), and where it is made:
- the sharer (user 0) names the target's attributes over several turns, mostly
  well before the share turn, partly with synonyms (``_mention_turns``);
- the last turn before the share is usually uninformative (``_LAST_PLAIN``);
- the other speaker names distractor values of the same attributes (``_distractor``);
- filler chit-chat, which never uses attribute words, makes most dialogs longer
  than CLIP's 77-token window;
- MMDialog "chain" conversations refer to an earlier image ("another one from
  the same place") for an attribute that no text names.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dialclip_ray.data.synthetic.vocab import (ATTRIBUTES, BACKGROUND_WORDS, COLOUR_WORDS, COUNT_WORDS, SIZE_WORDS, VALUES, Scene, pick,
                    shape_word)

P_CANONICAL = 0.85  # share of attribute mentions using the canonical word (the rest: a synonym)

_GREETINGS = ["hey!", "hi there", "hello, how are you?", "good morning!", "hey, long time no see",
              "hi! how is your week going?", "hey, are you free to chat?", "hello friend"]
_GREETING_REPLIES = ["I'm good, thanks. how about you?", "doing fine, I just got home from work",
                     "not bad at all, a bit tired", "pretty good! what's up?", "all good here, busy as usual",
                     "great, thanks for asking", "hey! yeah I have some time now"]
_CHITCHAT = [
    "did you watch the game yesterday?", "I really need more coffee today",
    "work has been crazy this week", "my cat knocked my plant over again this morning",
    "I'm thinking of ordering pizza for dinner", "have you finished that book yet?",
    "the traffic this morning was terrible", "I finally cleaned my whole apartment",
    "my neighbour has been playing loud music all week", "I started learning to play the guitar",
    "we should grab lunch sometime soon", "my phone battery dies so fast lately",
    "I tried that new bakery downtown, it was amazing", "I can't believe it's already the weekend again",
    "my brother is visiting next month", "I have a dentist appointment tomorrow, ugh",
    "I watched a documentary about bees yesterday", "I'm trying to eat healthier this month",
    "my laptop keeps freezing when I open too many tabs", "I might take a few days off soon",
    "the new season of that show comes out on friday", "I burned my toast this morning haha",
    "I've been sleeping badly lately", "my mom called me for an hour today",
    "I signed up for a cooking class", "our team finally shipped the project",
]
_CHITCHAT_REPLIES = ["haha same", "oh no, that sounds annoying", "nice, good for you",
                     "I know what you mean", "really? tell me more", "that's funny", "lucky you",
                     "oh wow", "yeah totally", "hmm, I didn't know that", "same here honestly",
                     "that sounds fun", "ugh, I feel you"]
_INTROS = ["guess what I did this weekend", "I finally finished my art project",
           "I took a photo yesterday that I really like", "I've been making paper cutouts again lately",
           "you know my new hobby? I arrange cutouts and photograph them",
           "I spent the whole afternoon on a craft project", "I made something for my wall"]
_REACTIONS = ["oh nice", "that sounds cool", "wow", "haha love that", "sounds fun",
              "how long did it take?", "where did you get the idea?", "cool!", "oh really?", "interesting"]
_ANSWERS = ["about an hour", "I saw the idea online", "I just made it up", "not long actually",
            "a friend showed me how", "it was easier than I thought"]
_LAST_PLAIN_SHARER = ["want to see it?", "let me show you", "hold on, sending it now", "wanna see?",
                      "I'll send you the photo", "check this out"]
_LAST_PLAIN_OTHER = ["show me!", "can I see it?", "send a pic please", "I'd love to see it", "pics or it didn't happen"]
_AFTER_SHARE = ["nice!", "wow, I love it", "that looks great", "so cute", "thanks!", "haha glad you like it",
                "you should sell these", "amazing work", "I want to make something like that too"]
_NP_TEMPLATES = ["I made {np}{bg}", "I drew {np}{bg}", "so I cut out {np}{bg}", "it shows {np}{bg}",
                 "I arranged {np}{bg}", "the picture has {np}{bg}", "this time I did {np}{bg}"]
_BG_TEMPLATES = ["I took it {bgp}", "we spent the day {bgp}", "the {bgn} was lovely yesterday",
                 "I set everything up {bgp}", "I shot the photo {bgp}"]
_CORRECTIONS = ["haha no, mine are {v}", "nope, I went with {v}", "no way, {v} all the way", "I still like {v} more"]


def _count_np(rng: random.Random, count: int) -> str:
    return pick(rng, COUNT_WORDS[count], P_CANONICAL)


def noun_phrase(rng: random.Random, scene: Scene, attrs: set[str]) -> str:
    """A noun phrase naming only ``attrs`` of the scene (background excluded: see ``bg_phrase``)."""
    words = []
    if "count" in attrs:
        words.append(_count_np(rng, scene.count))
    else:
        words.append("some" if scene.count > 1 else "a")
    adjectives = []
    if "size" in attrs:
        adjectives.append(pick(rng, SIZE_WORDS[scene.size], P_CANONICAL))
    if "colour" in attrs:
        adjectives.append(pick(rng, COLOUR_WORDS[scene.colour], P_CANONICAL))
    if len(adjectives) == 2 and rng.random() < 0.3:
        adjectives.reverse()
    words += adjectives
    plural = scene.count > 1
    if "shape" in attrs:
        words.append(shape_word(rng, scene.shape, plural, P_CANONICAL))
    else:
        words.append("shapes" if plural else "shape")
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def bg_phrase(rng: random.Random, background: str) -> tuple[str, str]:
    return pick(rng, BACKGROUND_WORDS[background], P_CANONICAL)


def _mention(rng: random.Random, scene: Scene, attrs: set[str]) -> str:
    """One sharer turn naming ``attrs`` of the scene."""
    if attrs == {"background"}:
        bgn, bgp = bg_phrase(rng, scene.background)
        return rng.choice(_BG_TEMPLATES).format(bgn=bgn, bgp=bgp)
    bg = " " + bg_phrase(rng, scene.background)[1] if "background" in attrs else ""
    return rng.choice(_NP_TEMPLATES).format(np=noun_phrase(rng, scene, attrs - {"background"}), bg=bg)


def _value_word(rng: random.Random, attr: str, value) -> str:
    if attr == "colour":
        return pick(rng, COLOUR_WORDS[value], P_CANONICAL) + " ones"
    if attr == "size":
        return pick(rng, SIZE_WORDS[value], P_CANONICAL) + " ones"
    if attr == "shape":
        return shape_word(rng, value, True, P_CANONICAL)
    if attr == "count":
        return {1: "just one", 2: "two", 3: "three"}[value]
    return bg_phrase(rng, value)[1]


def _distractor(rng: random.Random, attr: str, value) -> str:
    """The other speaker naming a value that is not the target's."""
    v = _value_word(rng, attr, value)
    if attr == "background":
        return rng.choice([f"I'd rather be {v} right now", f"I spent my weekend {v}", f"I like taking photos {v}"])
    if attr == "count":
        return rng.choice([f"I would have made {v}", f"my sister always makes {v}"])
    return rng.choice([f"I prefer {v} myself", f"my sister loves {v}", f"oh I would have picked {v}",
                       f"{v} would look better I think"])


def _other_value(rng: random.Random, attr: str, value):
    return rng.choice([v for v in VALUES[attr] if v != value])


def _split_attributes(rng: random.Random, attrs: list[str], groups: int) -> list[set[str]]:
    attrs = attrs[:]
    rng.shuffle(attrs)
    cuts = sorted(rng.sample(range(1, len(attrs)), groups - 1))
    return [set(attrs[a:b]) for a, b in zip([0, *cuts], [*cuts, len(attrs)])]


def photochat_dialog(rng: random.Random, scene: Scene) -> list[dict]:
    """Turns of one PhotoChat-format dialog (keys ``message``, ``share_photo``, ``user_id``) about ``scene``."""
    turns: list[tuple[int, str]] = []
    topics = rng.sample(_CHITCHAT, len(_CHITCHAT))  # no topic twice in one dialog

    def chitchat(n: int) -> None:
        for _ in range(n):
            who = rng.randint(0, 1)
            turns.append((who, topics.pop()))
            if rng.random() < 0.7:
                turns.append((1 - who, rng.choice(_CHITCHAT_REPLIES)))

    first = rng.randint(0, 1)
    turns.append((first, rng.choice(_GREETINGS)))
    turns.append((1 - first, rng.choice(_GREETING_REPLIES)))
    chitchat(rng.randint(1, 3))
    turns.append((0, rng.choice(_INTROS)))
    turns.append((1, rng.choice(_REACTIONS)))
    groups = _split_attributes(rng, list(ATTRIBUTES), rng.randint(2, 4))
    late = groups.pop() if len(groups) > 2 and rng.random() < 0.3 else None
    distract = set(rng.sample(range(len(groups)), min(len(groups), rng.randint(1, 2))))
    for gi, group in enumerate(groups):
        turns.append((0, _mention(rng, scene, group)))
        if gi in distract:
            attr = rng.choice(sorted(group))
            turns.append((1, _distractor(rng, attr, _other_value(rng, attr, getattr(scene, attr)))))
            if rng.random() < 0.75:
                turns.append((0, rng.choice(_CORRECTIONS).format(v=_value_word(rng, attr, getattr(scene, attr)))))
        elif rng.random() < 0.6:
            turns.append((1, rng.choice(_REACTIONS)))
            if rng.random() < 0.4:
                turns.append((0, rng.choice(_ANSWERS)))
    chitchat(rng.randint(2, 4))  # pushes most mentions out of the newest 77 tokens
    if late is not None:
        turns.append((0, _mention(rng, scene, late)))
    if rng.random() < 0.3:
        attr = rng.choice(ATTRIBUTES)
        turns.append((0, "here, " + _mention(rng, scene, {attr})))
    elif rng.random() < 0.5:
        turns.append((0, rng.choice(_LAST_PLAIN_SHARER)))
    else:
        turns.append((1, rng.choice(_LAST_PLAIN_OTHER)))
    out = [{"message": m, "share_photo": False, "user_id": u} for u, m in turns]
    out.append({"message": "", "share_photo": True, "user_id": 0})
    for k in range(rng.randint(1, 4)):
        if k == 0 and rng.random() < 0.3:  # leaks a wrong attribute after the share: loaders must drop it
            attr = rng.choice(["colour", "shape", "size"])
            out.append({"message": _distractor(rng, attr, _other_value(rng, attr, getattr(scene, attr))),
                        "share_photo": False, "user_id": 1})
        else:
            out.append({"message": rng.choice(_AFTER_SHARE), "share_photo": False, "user_id": (k + 1) % 2})
    return out


# --------------------------------------------------------------------------- MMDialog-style


@dataclass
class ImageItem:
    """An image placed in a conversation; ``hidden`` names the attribute only an earlier image shows."""

    scene: Scene
    hidden: str | None = None
    source: int | None = None  # index (in conversation image order) of the image that shows it


@dataclass
class Conversation:
    turns: list[list[str | ImageItem]] = field(default_factory=list)  # items of each turn, in order
    kind: str = "plain"


_MM_OPENERS_IMG = ["look what I made today!", "my latest creation", "first try with the new camera",
                   "this came out better than expected", "remember this?"]
_MM_OPENERS = ["anyone else into paper crafts?", "sharing some of my recent work", "weekend project time",
               "hey everyone, quick question about my hobby", "new photos from my collection"]
_MM_SAME_PLACE = ["another picture from the same place, {np} this time", "same spot as before, but {np}",
                  "took this one at the same place: {np}"]
_MM_SAME_COLOUR = ["same colour as the first one, {np}{bg}", "I reused that colour: {np}{bg}",
                   "again in that colour, {np}{bg}"]
_MM_SHARE = ["here's mine: {np}{bg}", "I made {np}{bg}", "check these out: {np}{bg}", "{np}{bg}, what do you think?"]


def _mm_text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        return rng.choice(_REACTIONS)
    if r < 0.6:
        return rng.choice(_CHITCHAT)
    if r < 0.8:
        return rng.choice(_CHITCHAT_REPLIES)
    return rng.choice(_ANSWERS)


def _full_share(rng: random.Random, scene: Scene, omit: frozenset[str] = frozenset()) -> str:
    attrs = set(ATTRIBUTES) - {"background"} - omit
    bg = "" if "background" in omit else " " + bg_phrase(rng, scene.background)[1]
    return rng.choice(_MM_SHARE).format(np=noun_phrase(rng, scene, attrs), bg=bg)


def mmdialog_conversation(rng: random.Random, random_scene, chain: bool) -> Conversation:
    """One MMDialog-style conversation; ``random_scene(rng)`` draws scenes.

    A chain conversation opens with an image X whose text omits one attribute
    (``hidden``: background or colour); a later image Y shares that value with X
    and its text says only "the same place" / "the same colour".
    """
    conv = Conversation(kind="chain" if chain else "plain")
    hidden, y = "", None
    n_turns = rng.randint(4, 8)
    image_turns: set[int] = set()
    if chain:
        hidden = rng.choice(["background", "colour"])
        x = random_scene(rng)
        y = random_scene(rng)._replace(**{hidden: getattr(x, hidden)})
        while y == x:
            y = random_scene(rng)._replace(**{hidden: getattr(x, hidden)})
        shown = set(rng.sample([a for a in ATTRIBUTES if a not in (hidden, "background")], rng.randint(0, 2)))
        opener = rng.choice(_MM_OPENERS_IMG)
        if shown:
            opener += (" " if opener[-1] in "!?" else ", ") + noun_phrase(rng, x, shown)
        conv.turns.append([opener, ImageItem(x)])
        y_turn = rng.choice([t for t in range(2, n_turns) if t % 2 == 0])
        image_turns.add(y_turn)
        if y_turn + 1 < n_turns and rng.random() < 0.4:  # only after Y: its text must not name Y's hidden value
            image_turns.add(rng.randint(y_turn + 1, n_turns - 1))
    else:
        conv.turns.append([rng.choice(_MM_OPENERS)])
        y_turn = -1
        image_turns.update(rng.sample(range(1, n_turns), rng.randint(1, 2)))
    for t in range(1, n_turns):
        if t == y_turn:
            if hidden == "background":
                text = rng.choice(_MM_SAME_PLACE).format(np=noun_phrase(rng, y, set(ATTRIBUTES) - {"background"}))
            else:
                bg = " " + bg_phrase(rng, y.background)[1]
                text = rng.choice(_MM_SAME_COLOUR).format(
                    np=noun_phrase(rng, y, set(ATTRIBUTES) - {"background", "colour"}), bg=bg)
            conv.turns.append([text, ImageItem(y, hidden=hidden, source=0)])
        elif t in image_turns:  # a self-described image, sometimes partly in the speaker's previous turn
            z = random_scene(rng)
            early: frozenset[str] = frozenset()
            if t >= 3 and t - 2 not in image_turns and rng.random() < 0.5:
                early = frozenset(rng.sample(ATTRIBUTES, rng.randint(1, 2)))
                conv.turns[t - 2] = [_mention(rng, z, set(early))]
            conv.turns.append([_full_share(rng, z, early), ImageItem(z)])
        elif chain and t == 1 and rng.random() < 0.5:
            # distractor about an attribute that is visible in text anyway; never the hidden value
            attr = rng.choice(["size", "shape"])
            conv.turns.append([_distractor(rng, attr, _other_value(rng, attr, getattr(y, attr)))])
        else:
            conv.turns.append([_mm_text(rng)])
    return conv


def text_pool(rng: random.Random, random_scene, n: int) -> list[str]:
    """``n`` distinct response texts of the kinds that occur in conversations (negative text candidates)."""
    seen: dict[str, None] = {}
    makers = [lambda: _mm_text(rng), lambda: _full_share(rng, random_scene(rng)),
              lambda: _mention(rng, random_scene(rng), set(rng.sample(ATTRIBUTES, rng.randint(1, 3)))),
              lambda: _distractor(rng, "colour", rng.choice(VALUES["colour"]))]
    tries = 0
    while len(seen) < n:
        tries += 1
        if tries > 50 * n:
            raise RuntimeError(f"could not make {n} distinct texts")
        seen.setdefault(rng.choice(makers)(), None)
    return list(seen)
