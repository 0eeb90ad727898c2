"""Dialog text for the synthetic corpus: PhotoChat-style dialogs and MMDialog-style conversations.

What makes the retrieval task fair (README, "Is the synthetic task a fair test?"), and where it is made:
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
from typing import Callable

from dialclip_ray.data.synthetic.vocab import (ATTRIBUTES, BACKGROUND_WORDS, COLOUR_WORDS, COUNT_WORDS, SHAPE_WORDS,
                                               SIZE_WORDS, VALUES, Scene, pick, shape_word)

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


_DISTRACT_BG = ["I'd rather be {v} right now", "I spent my weekend {v}", "I like taking photos {v}"]
_DISTRACT_COUNT = ["I would have made {v}", "my sister always makes {v}"]
_DISTRACT_OTHER = ["I prefer {v} myself", "my sister loves {v}", "oh I would have picked {v}", "{v} would look better I think"]
_GENERIC_NOUNS = ["some shapes", "a shape", "ones"]  # what noun_phrase / _value_word say for an unnamed attribute
# Phrases written inline below (pronouns, the chain anchor): listed so the stand-in's pretraining text
# (alttext.py reads every module-level phrase list) covers them.
_INLINE_PHRASES = ["they are", "it is", "the ones in your second photo"]


def _distractor(rng: random.Random, attr: str, value) -> str:
    """The other speaker naming a value that is not the target's."""
    v = _value_word(rng, attr, value)
    if attr == "background":
        return rng.choice(_DISTRACT_BG).format(v=v)
    if attr == "count":
        return rng.choice(_DISTRACT_COUNT).format(v=v)
    return rng.choice(_DISTRACT_OTHER).format(v=v)


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
#
# A conversation is a thread between two people (speaker = turn index % 2, as the
# loader assigns it) about things one of them made. Every text item of a turn after
# the first is a retrieval target (design 3.3), so the text items are written as
# replies whose content the conversation determines, the way real replies are:
#   comment   the other speaker on the photo just shared; it names at least one value
#             that only an earlier turn said (or, in chains, only a photo shows);
#   ack       the sharer's thanks, naming a value the comment did not;
#   question  asks about an earlier object by its anchor ("the ones for your sister");
#   answer    answers it with the value said (or shown) turns earlier: the question
#             itself holds no value word;
#   callback  refers back to an object several turns old;
#   reference (chain) "another one from the same place": the value is only in an earlier photo.
# New information still has to enter somewhere (``setup`` and ``share`` texts) and
# people still chit-chat (``generic``): those targets are not predictable, as in real
# data. The hard negative texts of a reply (``TextItem.variants``) are fresh paraphrases of
# the same kind about a one-attribute neighbour scene: telling them apart takes the value
# the context gives, and none of them copies a context turn. ``TextItem.grounding`` says where the named values are:
# ``last_turn`` (all in the previous turn's text), ``earlier_text`` (some only in older
# turns), ``image`` (some only in a photo), ``new`` (some nowhere in the context),
# ``none`` (no attribute named).


@dataclass
class ImageItem:
    """An image placed in a conversation; ``hidden`` names the attribute only an earlier image shows."""

    scene: Scene
    hidden: str | None = None
    source: int | None = None  # index (in conversation image order) of the image that shows it


@dataclass
class TextItem:
    """A text item with what it names, so the writer can build hard negatives and the truth sidecar."""

    text: str
    kind: str = "generic"
    scene: Scene | None = None
    attrs: frozenset[str] = frozenset()
    render: Callable[[Scene], str] | None = field(default=None, repr=False)
    grounding: str = "none"
    extra: dict = field(default_factory=dict)  # reply_renderer arguments (answer: asked; callback: own)
    sources: tuple[int, ...] = ()  # earlier turns whose text names one of ``attrs`` of ``scene``'s object
    image_turn: int | None = None  # the earlier turn with that object's photo

    def variants(self, rng: random.Random) -> list["TextItem"]:
        """Hard negatives: for each named attribute and each other value, a fresh paraphrase of the same
        reply kind (``reply_renderer``) about the scene with that value. Only ``REPLY_KINDS``."""
        if self.kind not in REPLY_KINDS or self.scene is None:
            return []
        out: dict[str, TextItem] = {}
        for attr in sorted(self.attrs):
            for value in VALUES[attr]:
                if value != getattr(self.scene, attr):
                    scene = self.scene._replace(**{attr: value})
                    text = reply_renderer(self.kind, rng, self.attrs, **self.extra)(scene)
                    if text != self.text and text not in out:
                        out[text] = TextItem(text, self.kind, scene, self.attrs, None, self.grounding, self.extra)
        return list(out.values())

    def true_of(self, scene: Scene) -> bool:
        """Whether the text's named values all hold for ``scene`` (a text naming none is about nothing)."""
        return bool(self.attrs) and self.scene is not None and all(
            getattr(self.scene, a) == getattr(scene, a) for a in self.attrs)

    @property
    def signature(self) -> tuple:
        """What the text says: its kind and the values it names (two texts with one signature are
        paraphrases, so one must not be the other's negative). Generic texts: the text itself."""
        if self.scene is None or not self.attrs:
            return (self.kind, self.text)
        return (self.kind, tuple((a, getattr(self.scene, a)) for a in sorted(self.attrs)))


@dataclass
class Conversation:
    turns: list[list[TextItem | ImageItem]] = field(default_factory=list)  # items of each turn, in order
    kind: str = "plain"


@dataclass(frozen=True)
class Wording:
    """Synonym index per attribute (``ATTRIBUTES`` order, 0 = canonical) and adjective order, fixed per
    text: a hard negative then differs from its target in the swapped value's word only."""

    syn: tuple[int, ...]
    swap: bool = False

    @staticmethod
    def draw(rng: random.Random) -> "Wording":
        return Wording(tuple(0 if rng.random() < P_CANONICAL else rng.randint(1, 6) for _ in ATTRIBUTES),
                       rng.random() < 0.3)

    def word(self, attr: str, options: list):
        i = self.syn[ATTRIBUTES.index(attr)]
        return options[0] if i == 0 or len(options) == 1 else options[1 + (i - 1) % (len(options) - 1)]


def w_noun_phrase(scene: Scene, attrs: frozenset[str] | set[str], w: Wording, definite: bool = False) -> str:
    """``two small red stars`` / ``the pair of red ones`` naming only ``attrs`` (background excluded)."""
    plural = scene.count > 1
    words = ["the"] if definite else []
    if "count" in attrs:
        count = w.word("count", COUNT_WORDS[scene.count])
        words.append(count.removeprefix("a ").removeprefix("just ") if definite else count)
    elif not definite:
        words.append("some" if plural else "a")
    adjectives = []
    if "size" in attrs:
        adjectives.append(w.word("size", SIZE_WORDS[scene.size]))
    if "colour" in attrs:
        adjectives.append(w.word("colour", COLOUR_WORDS[scene.colour]))
    if w.swap:
        adjectives.reverse()
    words += adjectives
    if "shape" in attrs:
        words.append(w.word("shape", SHAPE_WORDS[scene.shape])[1 if plural else 0])
    elif adjectives:
        words.append("ones" if plural else "one")
    else:
        words.append("shapes" if plural else "shape")
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def w_background(scene: Scene, w: Wording) -> tuple[str, str]:
    """(noun, prepositional phrase) of the scene's background in this wording."""
    return w.word("background", BACKGROUND_WORDS[scene.background])


def _np_bg(scene: Scene, attrs: frozenset[str], w: Wording, definite: bool = False) -> str:
    text = w_noun_phrase(scene, attrs - {"background"}, w, definite)
    return text + (" " + w_background(scene, w)[1] if "background" in attrs else "")


# (setup phrase, how the other speaker refers to it later): who the object was made for; no attribute words
_ANCHORS = [(f"for {mine}", f"the ones for {yours}") for mine, yours in (
    ("my sister", "your sister"), ("my mum's birthday", "your mum's birthday"), ("the school fair", "the school fair"),
    ("my nephew", "your nephew"), ("the kitchen wall", "the kitchen wall"), ("our office", "your office"),
    ("a friend's wedding", "your friend's wedding"), ("the bake sale", "the bake sale"), ("my grandma", "your grandma"),
    ("the kids' room", "the kids' room"), ("my neighbour", "your neighbour"), ("the craft club", "the craft club"))]
_PREFIXES = ["", "", "", "haha ", "oh wow, ", "ok so ", "anyway, ", "btw ", "sorry, was at work. ", "back now! ",
             "ugh, long day. ", "omg ", "lol ", "wait, "]
_MM_OPENERS_IMG = ["look what I made today!", "my latest creation", "first try with the new camera",
                   "this came out better than expected", "remember this?"]
_MM_OPENERS = ["anyone else into paper crafts?", "sharing some of my recent work", "weekend project time",
               "hey, quick question about my hobby", "new photos from my collection", "guess what I've been up to"]
_MM_OPENER_REPLIES = ["oh tell me more!", "yes! show me", "I've been waiting for this", "haha go on",
                      "what have you been making?", "I love seeing your projects"]
_MM_SAME_PLACE = ["another picture from the same place, {np} this time", "same spot as before, but {np}",
                  "took this one at the same place: {np}"]
_MM_SAME_COLOUR = ["same colour as the first one, {np}", "I reused that colour: {np}", "again in that colour, {np}"]
_MM_SETUP = ["I made {np} {mine}", "working on {np} {mine} right now", "finally finished {np} {mine}",
             "so I cut out {np} {mine}", "I put together {np} {mine}"]
_MM_SETUP_BG = [", I'll photograph {them} {bgp}", ", going to take the photo {bgp}"]
_MM_SHARE = ["here {be}: {np}", "took the photo: {np}", "{np}, what do you think?", "ta-da, {np}",
             "here's how {it} turned out: {np}"]
_MM_COMMENT = ["love {np}!", "{np} look amazing", "wow, {np}, so pretty", "{np} came out great",
               "I really like {np}", "ooh {np}, nice"]
_MM_ECHO = ["ooh, {np}? can't wait to see", "{np}, nice choice", "oh I love {np}", "{np}? show me!"]
_MM_ACK = ["thanks! {np} took forever", "thank you! getting {np} right was the hard part", "haha thanks, {np} were fun",
           "thanks, I wasn't sure about {np} at first"]
_MM_QUESTIONS = {
    "colour": ["what colour were {ref} again?", "remind me, what colour were {ref}?"],
    "shape": ["what shape were {ref} again?", "remind me, what shape were {ref}?"],
    "count": ["how many were in {ref}?", "remind me, how many were in {ref}?"],
    "size": ["what size were {ref}?", "remind me, what size were {ref}?"],
    "background": ["where did you take the photo of {ref}?", "where was the photo of {ref} taken?"],
}
_MM_ANSWERS = ["{v}, remember?", "{v}, I told you", "oh, {v}", "{v} I think", "{v}!", "it was {v}"]
_MM_CALLBACK_OTHER = ["still thinking about your {own}", "honestly {the} {were} my favourite",
                      "I showed my friend your {own}", "can't get over {the}"]
_MM_CALLBACK_OWNER = ["I might make {np} again", "I still have {the} on my shelf", "maybe I'll redo {the} someday"]
_MM_REACTIONS = _REACTIONS + _LAST_PLAIN_OTHER + ["ooh", "can't wait to see it", "nice, for who?"]


@dataclass
class _Obj:
    """An object under discussion: its scene, owner, anchor and where its values were said or shown."""

    scene: Scene
    owner: int
    anchor: tuple[str, str] = ("for fun", "the ones you made for fun")
    said: dict[str, list[int]] = field(default_factory=dict)  # attribute -> turns whose text names it
    shown_at: int | None = None  # turn of its photo
    banned: frozenset[str] = frozenset()  # attributes no text may name (yet)

    def known(self, turn: int) -> set[str]:
        """Attributes a reader of turns < ``turn`` can know: named in text, or visible in a shown photo."""
        if self.shown_at is not None and self.shown_at < turn:
            return set(ATTRIBUTES) - self.banned
        return {a for a, ts in self.said.items() if any(t < turn for t in ts)} - self.banned

    def grounding(self, attrs: frozenset[str], turn: int) -> str:
        ground = []
        for a in attrs:
            ts = [t for t in self.said.get(a, []) if t < turn]
            if turn - 1 in ts:
                ground.append(0)
            elif ts:
                ground.append(1)
            elif self.shown_at is not None and self.shown_at < turn:
                ground.append(2)
            else:
                ground.append(3)
        return ("last_turn", "earlier_text", "image", "new")[max(ground)] if ground else "none"


class _Thread:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.turns: list[list[TextItem | ImageItem]] = []
        self.objects: list[_Obj] = []

    @property
    def speaker(self) -> int:
        return len(self.turns) % 2

    def prefix(self) -> str:
        return self.rng.choice(_PREFIXES)

    def text(self, kind: str, obj: _Obj, attrs: set[str], render: Callable[[Scene], str]) -> TextItem:
        """A text item for the turn about to be appended; records which values it says."""
        t = len(self.turns)
        attrs = frozenset(attrs)
        item = TextItem(render(obj.scene), kind, obj.scene, attrs, render, obj.grounding(attrs, t))
        item.sources = tuple(sorted({u for a in attrs for u in obj.said.get(a, []) if u < t}))
        item.image_turn = obj.shown_at if obj.shown_at is not None and 0 <= obj.shown_at < t else None
        for a in attrs:
            obj.said.setdefault(a, []).append(t)
        return item

    def generic(self, lines: list[str]) -> None:
        self.turns.append([TextItem(self.rng.choice(lines))])

    def chit_chat(self) -> None:
        line = self.rng.choice(_CHITCHAT)
        if self.rng.random() < 0.4:
            line = self.rng.choice(_CHITCHAT_REPLIES) + ". " + line
        self.turns.append([TextItem(line)])

    def _pick(self, pool: set[str] | list[str], k: int) -> set[str]:
        pool = sorted(pool)
        return set(self.rng.sample(pool, min(k, len(pool))))

    # ---- episodes -------------------------------------------------------------------------------------

    def photo_episode(self, scene: Scene, anchors: list[tuple[str, str]]) -> None:
        """setup -> reaction [-> chit-chat] -> share (+ photo) -> comment [-> ack]."""
        rng = self.rng
        owner = self.speaker
        obj = _Obj(scene, owner, anchors.pop()) if anchors else _Obj(scene, owner)
        self.objects.append(obj)
        first = self._pick(ATTRIBUTES, rng.randint(1, 3))
        w, tpl, pre = Wording.draw(rng), rng.choice(_MM_SETUP), self.prefix()
        mine = obj.anchor[0]
        bg_tpl = rng.choice(_MM_SETUP_BG)

        def setup(s: Scene) -> str:
            text = pre + tpl.format(np=w_noun_phrase(s, first - {"background"}, w), mine=mine)
            if "background" in first:
                text += bg_tpl.format(them="them" if s.count > 1 else "it", bgp=w_background(s, w)[1])
            return text

        self.turns.append([self.text("setup", obj, first, setup)])
        if rng.random() < 0.5:
            self.echo(obj)
        else:
            self.generic(_MM_REACTIONS)
        if rng.random() < 0.35:
            self.chit_chat()
            self.chit_chat()
        rest = frozenset(ATTRIBUTES) - first  # the photo is fully described by setup + share
        w2, tpl2, pre2 = Wording.draw(rng), rng.choice(_MM_SHARE), self.prefix()

        def share(s: Scene) -> str:
            return pre2 + tpl2.format(np=_np_bg(s, rest, w2), be="they are" if s.count > 1 else "it is",
                                      it="they" if s.count > 1 else "it")

        share_turn = len(self.turns)
        text = self.text("share", obj, set(rest), share)
        obj.shown_at = share_turn
        self.turns.append([text, ImageItem(scene)])
        self.comment(obj)
        if rng.random() < 0.6:
            self.ack(obj)

    def comment(self, obj: _Obj, must: set[str] | None = None) -> None:
        """The other speaker on ``obj``'s photo: 1-3 values, at least one not in the previous turn."""
        rng, t = self.rng, len(self.turns)
        known = obj.known(t)
        last = {a for a, ts in obj.said.items() if t - 1 in ts}
        attrs = set(must or ()) | self._pick(known - last, 1)
        self.reply("comment", obj, attrs | self._pick(known - attrs, rng.randint(1, 2)))

    def reply(self, kind: str, obj: _Obj, attrs: set[str], **extra) -> None:
        """Append a one-item turn: a reply of ``kind`` naming ``attrs`` of ``obj``."""
        render = reply_renderer(kind, self.rng, frozenset(attrs), **extra)
        item = self.text(kind, obj, attrs, render)
        item.extra = extra
        self.turns.append([item])

    def echo(self, obj: _Obj) -> None:
        """The other speaker repeating part of what the previous turn said (a last-turn reply)."""
        t = len(self.turns)
        last = {a for a, ts in obj.said.items() if t - 1 in ts}
        self.reply("echo", obj, self._pick(last, self.rng.randint(1, 2)))

    def ack(self, obj: _Obj) -> None:
        """The owner's thanks, naming a value the comment (the previous turn) did not."""
        rng, t = self.rng, len(self.turns)
        known = obj.known(t)
        last = {a for a, ts in obj.said.items() if t - 1 in ts}
        self.reply("ack", obj, self._pick(known - last, 1) | self._pick(known - {"background"}, rng.randint(0, 1)))

    def question_answer(self, obj: _Obj) -> None:
        """The other speaker asks for one value of an earlier object (by its anchor); the owner answers."""
        rng, t = self.rng, len(self.turns)
        asked = rng.choice(sorted(obj.known(t + 1)))
        q = rng.choice(_MM_QUESTIONS[asked]).format(ref=obj.anchor[1])
        self.turns.append([TextItem(self.prefix() + q, "question", grounding="anchor")])
        more = set()
        if asked in ("count", "size") or rng.random() < 0.6:
            more = self._pick(obj.known(t + 1) - {asked, "background"}, 1)
        self.reply("answer", obj, {asked} | more, asked=asked)

    def callback(self, obj: _Obj) -> None:
        """A reference to an object several turns old, by its owner or the other speaker."""
        rng, t = self.rng, len(self.turns)
        self.reply("callback", obj, self._pick(obj.known(t), rng.randint(2, 3)), own=self.speaker == obj.owner)


# Reply kinds whose named values the context determines: their hard negatives are fresh paraphrases of the
# same kind with one value changed (not copies of the target's wording, which would also copy context turns).
REPLY_KINDS = ("comment", "ack", "echo", "answer", "callback")


def reply_renderer(kind: str, rng: random.Random, attrs: frozenset[str], **extra) -> Callable[[Scene], str]:
    """scene -> text for a reply of ``kind`` naming ``attrs``; template, wording and prefix drawn from ``rng``."""
    w = Wording.draw(rng)
    if kind == "comment":
        tpl, pre = rng.choice(_MM_COMMENT), rng.choice(_PREFIXES)
        return lambda s: pre + tpl.format(np=_np_bg(s, attrs, w, definite=True))
    if kind == "ack":
        tpl = rng.choice(_MM_ACK)
        return lambda s: tpl.format(np=_np_bg(s, attrs, w, definite=True))
    if kind == "echo":
        tpl = rng.choice(_MM_ECHO)
        return lambda s: tpl.format(np=_np_bg(s, attrs, w))
    if kind == "answer":
        asked, tpl = extra["asked"], rng.choice(_MM_ANSWERS)

        def answer(s: Scene) -> str:
            if asked == "background":
                rest = attrs - {"background"}
                return tpl.format(v=(w_noun_phrase(s, rest, w) + " " if rest else "") + w_background(s, w)[1])
            return tpl.format(v=w_noun_phrase(s, attrs, w))

        return answer
    if kind == "callback":
        tpl = rng.choice(_MM_CALLBACK_OWNER if extra["own"] else _MM_CALLBACK_OTHER)
        pre = rng.choice(_PREFIXES)
        def callback(s: Scene) -> str:
            the = _np_bg(s, attrs, w, definite=True)
            return pre + tpl.format(np=_np_bg(s, attrs, w), the=the, own=the.removeprefix("the "),
                                    were="were" if s.count > 1 else "was")

        return callback
    raise ValueError(f"unknown reply kind {kind!r}")


def mmdialog_conversation(rng: random.Random, random_scene, chain: bool) -> Conversation:
    """One MMDialog-style conversation; ``random_scene(rng)`` draws scenes.

    A chain conversation opens with an image X whose text omits one attribute
    (``hidden``: background or colour); the next image Y shares that value with X
    and its text says only "the same place" / "the same colour". Then (and in plain
    conversations from the start) photo episodes, questions with their answers,
    callbacks and some chit-chat, in a random order.
    """
    conv = Conversation(kind="chain" if chain else "plain")
    th = _Thread(rng)
    anchors = rng.sample(_ANCHORS, 3)
    if chain:
        hidden = rng.choice(["background", "colour"])
        x = random_scene(rng)
        y = random_scene(rng)._replace(**{hidden: getattr(x, hidden)})
        while y == x:
            y = random_scene(rng)._replace(**{hidden: getattr(x, hidden)})
        ox = _Obj(x, 0, ("", "the ones in your first photo"), banned=frozenset({hidden}))
        th.objects.append(ox)
        shown = th._pick([a for a in ATTRIBUTES if a not in (hidden, "background")], rng.randint(0, 2))
        opener = rng.choice(_MM_OPENERS_IMG)
        w = Wording.draw(rng)
        if shown:
            opener += (" " if opener[-1] in "!?" else ", ") + w_noun_phrase(x, shown, w)
            ox.said.update({a: [0] for a in shown})
        ox.shown_at = 0
        th.turns.append([TextItem(opener, "opener"), ImageItem(x)])
        th.comment(ox)  # never names the hidden value: it is banned until Y
        if rng.random() < 0.3:
            th.chit_chat()
            th.chit_chat()
        # Y, by the owner of X: its text names every attribute but the hidden one
        oy = _Obj(y, 0, ("", "the ones in your second photo"))
        th.objects.append(oy)
        named = frozenset(ATTRIBUTES) - {hidden} - ({"background"} if hidden == "colour" else set())
        wy, pre = Wording.draw(rng), th.prefix()
        if hidden == "background":
            tpl = rng.choice(_MM_SAME_PLACE)
            render = lambda s: pre + tpl.format(np=w_noun_phrase(s, named, wy))  # noqa: E731
        else:
            tpl = rng.choice(_MM_SAME_COLOUR)
            render = lambda s: pre + tpl.format(  # noqa: E731
                np=w_noun_phrase(s, named, wy) + " " + w_background(s, wy)[1])
        attrs_y = set(named) | ({"background"} if hidden == "colour" else set())
        if th.speaker != 0:
            th.generic(_MM_REACTIONS)
        y_turn = len(th.turns)
        text = th.text("reference", oy, attrs_y, render)
        oy.shown_at = y_turn
        th.turns.append([text, ImageItem(y, hidden=hidden, source=0)])
        ox.banned = frozenset()
        th.comment(oy, must={hidden} if rng.random() < 0.5 else None)  # "love the beach again": the photo's value
    else:
        th.turns.append([TextItem(rng.choice(_MM_OPENERS), "opener")])
        if rng.random() < 0.4:
            th.generic(_MM_OPENER_REPLIES)
        th.photo_episode(random_scene(rng), anchors)
    if rng.random() < (0.35 if chain else 0.5):
        if rng.random() < 0.3:
            th.chit_chat()
            th.chit_chat()
        th.photo_episode(random_scene(rng), anchors)
    plan = ["qa", "callback"] + (["chat"] if rng.random() < 0.5 else [])
    rng.shuffle(plan)
    for step in plan:
        if step == "chat":
            th.chit_chat()
            th.chit_chat()
            continue
        obj = th.objects[0] if rng.random() < 0.6 else rng.choice(th.objects)  # people come back to the first one
        if step == "qa":
            if th.speaker == obj.owner:  # the other speaker asks
                th.generic(_CHITCHAT_REPLIES)
            th.question_answer(obj)
        elif rng.random() < 0.85:
            th.callback(obj)
    conv.turns = th.turns
    return conv


def random_text(rng: random.Random, random_scene) -> TextItem:
    """One response text of a kind that occurs in conversations, about a random scene (a negative)."""
    r = rng.random()
    if r < 0.3:
        return TextItem(rng.choice(_CHITCHAT + _CHITCHAT_REPLIES + _MM_REACTIONS + _ANSWERS + _MM_OPENER_REPLIES))
    th = _Thread(rng)
    obj = _Obj(random_scene(rng), 0, rng.choice(_ANCHORS), shown_at=-1)
    th.turns.append([TextItem("")])  # a previous turn, so the new one is not turn 0
    if r < 0.42:
        th.photo_episode(obj.scene, [obj.anchor])
        return rng.choice([x for t in th.turns[1:] for x in t if isinstance(x, TextItem) and x.kind != "generic"])
    th.objects.append(obj)
    if r < 0.6:
        th.comment(obj)
    elif r < 0.7:
        th.ack(obj)
    elif r < 0.9:
        th.question_answer(obj)
        return th.turns[-1 if rng.random() < 0.75 else -2][0]
    else:
        th.callback(obj)
    return th.turns[-1][0]


def text_pool(rng: random.Random, random_scene, n: int) -> list[TextItem]:
    """``n`` response texts (distinct strings) of the kinds that occur in conversations: negative candidates."""
    seen: dict[str, TextItem] = {}
    tries = 0
    while len(seen) < n:
        tries += 1
        if tries > 50 * n:
            raise RuntimeError(f"could not make {n} distinct texts")
        item = random_text(rng, random_scene)
        seen.setdefault(item.text, item)
    return list(seen.values())
