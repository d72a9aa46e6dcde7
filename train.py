"""Train Wyrd: data, tokenizer, pretraining, chat fine-tuning, checkpoints, exact resume.

    python train.py                       # everything, offline: tokenizer, pretrain and fine-tune on
                                          # the built-in corpus -> out/wyrd.safetensors (about 13 min)
    python train.py pretrain --data TinyStoriesV2-GPT4-train.txt --preset tiny --out out/ts.safetensors
    python train.py finetune --data oasst.trees.jsonl.gz builtin --init out/ts.safetensors --out out/chat.safetensors
    python train.py pretrain ... --resume # continue a stopped run from its last checkpoint, bit for bit
    python train.py pretrain ... --overwrite  # start over: without it, an existing run is never replaced
    python train.py convert IN OUT.jsonl  # any chat format -> {"messages": [...]} JSONL
    python train.py download tinystories|oasst

Read top to bottom: configuration, the built-in corpus, real-data loaders, the
token cache, batches, AdamW and the schedule, the training loop, checkpoints,
evaluation and sampling, the commands. `python train.py COMMAND --help` lists
every flag with its default.

Data formats (`--data`, several may be given; `builtin` is the generated corpus):
  stories  .txt[.gz] separated by <|endoftext|>; a .json[.gz] shard (a list of
           {"story": ...}); TinyStories_all_data.tar.gz (a tar of such shards)
  chats    {"messages": [{"role", "content"}, ...]} JSONL; OASST messages JSONL
           (parent_id links) or OASST trees JSONL (nested "replies"); each .gz or not
A malformed JSONL line (bad JSON, missing or wrong fields) is skipped: the first
few are reported with file and line, and the total at the end of the file. A
file with nothing usable in it is an error. Malformed JSON inside a .json
story shard cannot be resynchronised, so it stops the run, naming the offset.
"""
import wyrd  # first: autograd sets the BLAS/OpenMP thread policy before NumPy loads

import argparse
import codecs
import gzip
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from numba import njit, prange

from autograd import FAST, no_grad
from chat import Settings, complete, generate
from tokenizer import DEFAULT_SYSTEM, Tokenizer, TokenizerError

# ----------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 350            # optimizer steps
    batch_size: int = 8         # sequences per micro-batch
    grad_accum: int = 1         # micro-batches per optimizer step
    seq_len: int = 256          # tokens per sequence
    lr: float = 3e-3            # peak learning rate
    min_lr: float = 3e-4        # cosine floor
    warmup: int = 30            # linear warmup steps
    weight_decay: float = 0.1   # decoupled; matrices only
    grad_clip: float = 1.0      # max global gradient norm
    eval_every: int = 100       # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 8       # held-out batches per evaluation
    ckpt_every: int = 100       # steps between checkpoints (and always at the end / on Ctrl-C)
    log_every: int = 10         # steps between progress lines (the JSONL log gets every step)
    seed: int = 0               # model init and data order


# The defaults are those of the default run (`python train.py`): the `tiny` preset on
# 2 CPU cores, at most 15 minutes in all on a 2-core AVX2 machine. The built-in corpus
# is templated text that a small model learns fast, and Wyrd's init starts every block
# as the identity, so a high learning rate and a short warmup are safe.
PRETRAIN = TrainConfig()
FINETUNE = replace(PRETRAIN, steps=250, seq_len=384, lr=1e-3, min_lr=1e-4, warmup=20, weight_decay=0.01)
DEFAULT_STORIES = 20000         # built-in stories generated for pretraining (5% held out)
DEFAULT_CHATS = 12000           # built-in conversations for fine-tuning (5% held out)
STORY_SAMPLES = 20              # stories the default run samples to count character names
HELD_OUT_SEED = 1_000_003       # seed of the reply check's prompts, unused by training data
VAL_FRACTION = 0.05             # held-out share of each data set ...
VAL_MAX_TOKENS = 1 << 20        # ... capped, so a 2 GB corpus does not hold out 100 MB
FINAL_VAL_ROWS = 192            # held-out rows of the final evaluation (all of a small split)


# ----------------------------------------------------------------------------
# Built-in corpus: a seeded generator of TinyStories-style stories and ChatML
# conversations, so `python train.py` works offline. A story is drawn slot by
# slot (hero, friend, place, object, problem, phrasing); the product of the
# slots is in the billions, so a held-out split measures generalisation.
# ----------------------------------------------------------------------------

_GIRLS = ("Lily Mia Sue Anna Emma Zoe Lucy Ella Rosa Maya Nina Amy Kate Lola Ruby "
          "Daisy Jenny Sara Ivy Molly Grace Hannah Chloe Sophie Alice Rita").split()
_BOYS = ("Tim Ben Max Sam Tom Leo Jack Finn Noah Alex Jake Luke Adam Peter Danny "
         "Oliver Henry Billy Joe Ryan Eli Owen Toby Dan Paul Mark").split()
_PET_NAMES = ("Pip Coco Spot Fluffy Bella Buddy Nibbles Sunny Whiskers Patch Rusty "
              "Bubbles Tilly Ollie Hoppy Daisy Button Pebble Ziggy Mittens Rocky Bongo "
              "Sprout Muffin Lucky Ginger Pickle Dot Bruno Snowy").split()
_ANIMALS = ("cat dog bunny duck bear fox frog mouse bird owl pig lion turtle squirrel "
            "horse sheep cow puppy kitten monkey elephant hedgehog").split()
_TOYS = ("teddy bear|robot|doll|toy car|toy train|puppet|toy dinosaur").split("|")
_TRAITS = ("kind curious brave shy happy playful clever gentle silly friendly cheerful "
           "busy quiet funny").split()
_ADULTS = ("mom|dad|grandma|grandpa|teacher").split("|")
# name, "went ..." phrase, "was ..." phrase
_PLACES = [("park", "to the park", "in the park"), ("garden", "into the garden", "in the garden"),
           ("forest", "into the forest", "in the forest"), ("beach", "to the beach", "at the beach"),
           ("farm", "to the farm", "on the farm"), ("school", "to school", "at school"),
           ("pond", "to the pond", "by the pond"), ("hill", "up the hill", "on the hill"),
           ("library", "to the library", "in the library"), ("zoo", "to the zoo", "at the zoo"),
           ("meadow", "to the meadow", "in the meadow"), ("lake", "to the lake", "by the lake"),
           ("playground", "to the playground", "at the playground"),
           ("backyard", "into the backyard", "in the backyard"), ("river", "to the river", "by the river")]
_OBJECTS = ("ball kite hat box book balloon shell car bucket scarf boat drum "
            "blanket bike ribbon marble whistle").split()
_COLORS = "red blue green yellow pink purple orange white brown shiny".split()
_HIGH = ("tall tree|big tree|roof|high shelf|tall fence|lamp post").split("|")
_SPOTS = ("under a bush|behind a big rock|under the bench|in the tall grass|next to the swing|"
          "under a pile of leaves|inside an old box|behind the door|in the sand|under the bed").split("|")
_FEARS = "the dark|the thunder|the big dog|the deep water|the loud noise|the tall slide|the spider|the wind".split("|")
_FOODS = ("apple|carrot|cookie|sandwich|banana|piece of cake|bowl of soup|muffin").split("|")
_GIFTS = ("a drawing|a card|a crown made of flowers|a little clay cup|a paper boat|a necklace of shells").split("|")
_ACTIVITIES = ("play with {his} friends|run and jump|sing songs|draw pictures|look at the clouds|"
               "play games|dance|build things with blocks|read books|splash in puddles|"
               "pick flowers|chase butterflies").split("|")


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pronouns(he, prefix=""):
    him, his = {"he": ("him", "his"), "she": ("her", "her")}[he]
    return {prefix + "he": he, prefix + "him": him, prefix + "his": his,
            prefix + "He": he.capitalize(), prefix + "His": his.capitalize()}


def _character(rng, kind=None, name=None):
    """A story character: dict with name, kind, pronouns, trait, `intro` (a curious cat named Pip)."""
    if name is not None and kind is None:
        kind = "girl" if name in _GIRLS else "boy" if name in _BOYS else rng.choice(_ANIMALS)
    if kind is None:
        kind = rng.choice(["girl", "boy", "girl", "boy"] + [rng.choice(_ANIMALS), rng.choice(_TOYS)])
    if kind == "girl":
        he, name = "she", name or rng.choice(_GIRLS)
    elif kind == "boy":
        he, name = "he", name or rng.choice(_BOYS)
    else:
        he, name = rng.choice(["he", "she"]), name or rng.choice(_PET_NAMES)
    trait = rng.choice(_TRAITS)
    adjective = rng.choice([trait, "little"])
    return dict(name=name, kind=kind, trait=trait, intro=f"{_a(adjective)} {kind} named {name}",
                **_pronouns(he))


# Each problem is a list of beats; each beat is a list of alternative phrasings
# (a beat may hold several sentences). `{...}` slots are filled from the story.
# `qa` are questions a listener may ask afterwards, with their answers.
_PROBLEMS = {
    "lost": dict(
        beats=[["One day, {name} went {to_place} with {his} {color} {obj}.",
                "{name} had {a_obj} that {he} loved very much. One day, {he} took it {to_place}."],
               ["{He} played with the {obj} all morning. But when {he} looked again, the {obj} was gone!",
                "{He} put the {obj} down to play. When {he} came back, the {obj} was not there!"],
               ["{name} felt very sad. \"Where is my {obj}?\" {he} cried.",
                "{name} was worried. \"Oh no, I lost my {obj}!\" {he} said."],
               ["{friend_intro} saw {him} and asked, \"Why are you sad?\" {name} told {fhim} about the {obj}. "
                "\"I will help you look,\" said {fname}.",
                "Then {friend_intro} came by. \"Don't worry, {name}. Let's look together,\" said {fname}."],
               ["They looked everywhere. At last, {fname} found the {obj} {spot}!",
                "They looked high and low. Then {name} saw something {color} {spot}. It was the {obj}!"],
               ["{name} hugged {his} {obj} and smiled. \"Thank you, {fname}!\" {he} said. "
                "After that, {he} always kept the {obj} close.",
                "{name} was so happy. {He} thanked {fname}, and they played with the {obj} together "
                "until the sun went down."]],
        lesson="that friends can help you when you lose something",
        qa=[("What did {name} lose?", "{name} lost {his} {color} {obj}."),
            ("Where did they find the {obj}?", "They found the {obj} {spot}."),
            ("Who helped {name}?", "{fname} helped {name} look for the {obj}.")]),
    "stuck": dict(
        places="park garden beach farm hill meadow playground backyard".split(),
        beats=[["One windy day, {name} went {to_place} to play with {his} {color} {obj}.",
                "{name} loved {his} {color} {obj}. One day, {he} took it {to_place}."],
               ["{He} threw the {obj} up high. Oh no! The {obj} got stuck on top of a {high}.",
                "A big wind came and blew the {obj} away. It landed on a {high}!"],
               ["{name} tried to reach it, but {he} was too small. {He} felt sad. \"I can't get it,\" {he} said.",
                "{name} jumped and jumped, but the {obj} was too high. \"What can I do?\" {he} said."],
               ["Then {friend_intro} came. \"I can help!\" said {fname}. {fHe} found a long stick.",
                "{friend_intro} saw the {obj}. \"Let's get it down together,\" said {fname}, "
                "and {fhe} brought a long stick."],
               ["{fname} held the stick and {name} pushed. The {obj} fell down into {name}'s hands.",
                "They worked together, and soon the {obj} came down."],
               ["\"Thank you, {fname}!\" said {name}. The two friends played together all afternoon.",
                "{name} smiled a big smile. {He} learned that working together makes hard things easy."]],
        lesson="that working together makes hard things easy",
        qa=[("Where did the {obj} get stuck?", "The {obj} got stuck on a {high}."),
            ("How did they get the {obj} down?", "They used a long stick and worked together."),
            ("Who helped {name}?", "{fname} helped {name} get the {obj} down.")]),
    "broken": dict(
        beats=[["{name} had {a_obj}. It was {color} and {name} loved it.",
                "One morning, {name} was playing with {his} {color} {obj} {at_place}."],
               ["{He} played too fast and dropped it. Crack! The {obj} broke.",
                "{He} threw the {obj} too hard, and it hit the ground. The {obj} was broken."],
               ["{name} started to cry. \"My {obj} is broken!\" {he} said.",
                "{name} felt very sad. {He} did not know what to do."],
               ["{His} {adult} came and looked at the {obj}. \"We can fix it,\" {he2} said. \"Let's use some glue.\"",
                "{friend_intro} came to help. \"My {adult} can fix things,\" said {fname}. "
                "Together they asked for some glue."],
               ["They fixed the {obj} together. It was not perfect, but it worked again.",
                "With a little glue and a lot of care, the {obj} was as good as new."],
               ["{name} was happy again. From that day on, {he} was careful with {his} toys.",
                "\"Thank you!\" said {name}. {He} learned to be gentle with the things {he} loves."]],
        lesson="to be careful with the things you love",
        qa=[("What happened to the {obj}?", "The {obj} broke, but they fixed it with glue."),
            ("How did {name} feel when the {obj} broke?", "{name} felt very sad.")]),
    "share": dict(
        beats=[["{name} went {to_place} with {his} new {color} {obj}.",
                "One sunny day, {name} was playing {at_place} with {his} {color} {obj}."],
               ["{friend_intro} saw the {obj}. \"Can I play with it too?\" asked {fname}.",
                "Soon {friend_intro} came over. \"Your {obj} is so nice. Can I try?\" asked {fname}."],
               ["\"No, it is mine!\" said {name}. {fname} felt sad and walked away.",
                "{name} held the {obj} tight. \"No!\" {he} said. {fname} looked very sad."],
               ["Then {name} played alone, but it was not fun. {He} felt bad in {his} tummy.",
                "{name} played alone for a while, but {he} felt lonely."],
               ["{name} ran to {fname}. \"I am sorry. Let's play with the {obj} together,\" {he} said.",
                "So {name} went to {fname} and said, \"I'm sorry. You can play with my {obj}.\""],
               ["{fname} smiled, and they played together all day. {name} learned that sharing is more fun.",
                "They took turns and laughed a lot. From that day on, {name} always shared {his} toys."]],
        lesson="that sharing is more fun than playing alone",
        qa=[("Why was {fname} sad?", "{fname} was sad because {name} did not want to share the {obj}."),
            ("What did {name} do at the end?", "{name} said sorry and shared the {obj} with {fname}.")]),
    "scared": dict(
        beats=[["{name} went {to_place} with {his} {adult}.",
                "One day, {name} and {his} {adult} went {to_place}."],
               ["Then {name} noticed {fear}. {He} was very scared.",
                "Then {name} heard {fear}. {He} hid behind {his} {adult}."],
               ["\"I am scared of {fear},\" {name} said in a small voice.",
                "{name} did not want to go on. \"I don't like {fear},\" {he} said."],
               ["{His} {adult} held {his} hand. \"It is okay to be scared. I am here with you,\" {he2} said.",
                "{friend_intro} was there too. \"Don't be scared. We can be brave together,\" said {fname}."],
               ["{name} took a deep breath and tried again. It was not so bad after all!",
                "{name} counted to three and was brave. Soon {he} was not scared anymore."],
               ["{name} felt proud. \"I was brave!\" {he} said with a big smile.",
                "That night, {name} told everyone how brave {he} was. {He} felt very proud."]],
        lesson="that you can be brave even when you are scared",
        qa=[("What was {name} scared of?", "{name} was scared of {fear}."),
            ("How did {name} feel at the end?", "{name} felt proud because {he} was brave.")]),
    "rain": dict(
        places="park garden beach farm pond hill zoo meadow lake playground backyard river".split(),
        beats=[["{name} wanted to go {to_place} to play with {his} {color} {obj}.",
                "{name} had a plan. {He} would go {to_place} and play with {his} {obj}."],
               ["But then the sky turned gray, and it started to rain.",
                "But when {he} looked out the window, big drops of rain were falling."],
               ["{name} was sad. \"Now I can't play outside,\" {he} said.",
                "{name} felt grumpy. \"I don't like the rain,\" {he} said."],
               ["{His} {adult} smiled. \"Let's build a fort inside,\" {he2} said.",
                "\"We can have fun inside too,\" said {his} {adult}. \"Let's paint a picture.\""],
               ["So they played inside, and it was a lot of fun. Later, the rain stopped and a rainbow came out.",
                "They played and laughed all afternoon. When the rain stopped, {name} saw a big rainbow."],
               ["{name} was happy. {He} learned that a rainy day can be a fun day too.",
                "{name} smiled. \"Rainy days are fun too!\" {he} said."]],
        lesson="that a rainy day can be a fun day too",
        qa=[("Why couldn't {name} play outside?", "{name} could not play outside because it was raining."),
            ("What did they see when the rain stopped?", "They saw a big rainbow.")]),
    "hungry": dict(
        places="park garden forest farm pond meadow lake backyard river hill".split(),
        beats=[["{name} was walking {at_place} with {his} {adult}.",
                "One day, {name} went {to_place} to look for flowers."],
               ["{He} saw a little {small} sitting alone. It looked sad and hungry.",
                "Under a tree, {name} found a little {small}. It was cold and hungry."],
               ["\"Poor little {small},\" said {name}. \"I want to help you.\"",
                "{name} felt sorry for the little {small}. \"Don't be sad,\" {he} said softly."],
               ["{He} gave the {small} {his} {food}. The {small} ate it all up.",
                "{name} shared {his} {food} with the {small}, and it ate happily."],
               ["The {small} was not sad anymore. It followed {name} all the way home.",
                "Soon the little {small} felt warm and happy. It did a little dance."],
               ["From that day on, the {small} and {name} were best friends.",
                "{name} felt happy inside. Helping others made {him} feel good."]],
        lesson="that helping others makes you feel good",
        qa=[("What did {name} find?", "{name} found a little {small} that was sad and hungry."),
            ("What did {name} give to the {small}?", "{name} gave the {small} {his} {food}.")]),
    "race": dict(
        places="park beach farm hill meadow playground school".split(),
        beats=[["One day, there was a big race {at_place}.",
                "{name} and {friend_intro} wanted to have a race {at_place}."],
               ["{name} wanted to win so much. {He} ran very fast.",
                "\"Ready, set, go!\" Everyone ran as fast as they could. {name} ran the fastest."],
               ["But then {name} tripped and fell down. {He} hurt {his} knee and started to cry.",
                "Suddenly, {name} fell on the grass. \"Ouch!\" {he} cried."],
               ["{fname} stopped running and came back. \"Are you okay?\" asked {fname}. {fHe} helped {name} get up.",
                "{fname} saw {name} fall and ran back to help. \"Let me help you,\" said {fname}."],
               ["They walked to the end together, holding hands.",
                "The two friends finished the race together."],
               ["They did not win, but they were happy. {name} learned that a good friend is better than winning.",
                "\"Thank you,\" said {name}. Being kind was more important than winning."]],
        lesson="that a good friend is better than winning",
        qa=[("What happened in the race?", "{name} fell down, and {fname} came back to help."),
            ("Did they win the race?", "No, but they finished together and were happy.")]),
    "gift": dict(
        beats=[["It was {fname}'s birthday. {name} wanted to give {fhim} a gift.",
                "{name} had a good friend, {friend_intro}. Tomorrow was {fname}'s birthday."],
               ["But {name} had no money to buy a gift. {He} felt worried.",
                "{name} looked {at_place}, but {he} could not find a gift. {He} was sad."],
               ["\"What can I give to {fname}?\" {name} asked {his} {adult}.",
                "\"I have nothing to give,\" {name} said to {his} {adult}."],
               ["\"You can make something,\" said {his} {adult}. \"A gift from the heart is the best gift.\"",
                "{His} {adult} smiled. \"Why don't you make a gift?\" {he2} said."],
               ["So {name} made {gift}. It took a long time, but {he} did it.",
                "{name} worked all afternoon and made {gift}."],
               ["{fname} loved the gift. \"This is the best gift ever!\" {fhe} said, and gave {name} a big hug.",
                "When {fname} saw {gift}, {fhe} smiled a big smile. \"Thank you, {name}!\""]],
        lesson="that a gift from the heart is the best gift",
        qa=[("What did {name} make for {fname}?", "{name} made {gift} for {fname}."),
            ("Why did {name} make a gift?", "It was {fname}'s birthday, and {name} wanted to give {fhim} something.")]),
    "shy": dict(
        places="park school playground library zoo beach".split(),
        beats=[["{name} was new {at_place}. {He} did not know anyone.",
                "{name} went {to_place} for the first time. {He} felt shy."],
               ["All the other kids were playing, but {name} stood alone.",
                "{He} wanted to play, but {he} was too shy to say hello."],
               ["\"Nobody wants to play with me,\" {name} thought sadly.",
                "{name} felt lonely and looked at {his} shoes."],
               ["Then {friend_intro} came over. \"Hi! Do you want to play with my {obj}?\" asked {fname}.",
                "Then {name} saw {friend_intro} sitting alone too. {name} was brave and said, "
                "\"Hello! Do you want to play?\""],
               ["They played with the {color} {obj} and laughed together.",
                "They played all day and had lots of fun."],
               ["{name} was not shy anymore. {He} had a new friend!",
                "From that day on, {name} and {fname} were best friends."]],
        lesson="that saying hello is a good way to make a friend",
        qa=[("How did {name} feel at first?", "{name} felt shy and lonely at first."),
            ("Who became {name}'s friend?", "{fname} became {name}'s friend.")]),
    "lost_way": dict(
        places="forest meadow beach farm park hill river lake".split(),
        beats=[["{name} went {to_place} to look for {color} flowers.",
                "One day, {name} was playing {at_place}. {He} saw a pretty butterfly and followed it."],
               ["{He} walked and walked. When {he} looked up, {he} did not know where {he} was.",
                "Soon {name} was far away. Everything looked different, and {he} could not see {his} house."],
               ["{name} was scared. \"I am lost!\" {he} cried.",
                "{name} felt afraid. \"How do I get home?\" {he} said."],
               ["A wise old owl saw {him}. \"Follow the path by the river,\" said the owl. \"It will take you home.\"",
                "Then {friend_intro} came by. \"I know the way. Come with me,\" said {fname}."],
               ["{name} followed the path, and soon {he} saw {his} house.",
                "They walked together, and soon {name} was home."],
               ["{His} {adult} gave {him} a big hug. {name} learned to always stay close to home.",
                "{name} was so happy to be home. From then on, {he} never went too far alone."]],
        lesson="to stay close to home",
        qa=[("Why did {name} get lost?", "{name} walked too far and did not know the way back."),
            ("How did {name} get home?", "{name} followed the path and found {his} house.")]),
    "mess": dict(
        beats=[["{name} was playing with paint in the kitchen.",
                "{name} came home from the {place} with muddy feet."],
               ["Splash! The paint went everywhere. There was a big mess on the floor.",
                "{He} ran inside, and mud got all over the floor. What a big mess!"],
               ["{His} {adult} came in. \"Oh no, look at this mess!\" {he2} said. {name} felt bad.",
                "When {his} {adult} saw the mess, {he2} was not happy. {name} felt sorry."],
               ["\"I am sorry,\" said {name}. \"I will clean it up.\"",
                "{name} said, \"I'm sorry. I can help clean.\""],
               ["{name} got a cloth and cleaned the floor until it was shiny.",
                "{name} and {his} {adult} cleaned the floor together."],
               ["{His} {adult} smiled and gave {him} a hug. \"Thank you for helping,\" {he2} said.",
                "{name} learned that when you make a mess, you should clean it up."]],
        lesson="that when you make a mess, you should clean it up",
        qa=[("What did {name} do wrong?", "{name} made a big mess on the floor."),
            ("What did {name} do to fix it?", "{name} said sorry and cleaned up the mess.")]),
}
_SMALL_ANIMALS = "bird kitten puppy duckling mouse bunny squirrel hedgehog".split()
# topics a user may ask a story about -> problem key
_THEMES = {"sharing": "share", "being brave": "scared", "friendship": "shy", "helping others": "hungry",
           "a rainy day": "rain", "a birthday": "gift", "a race": "race", "getting lost": "lost_way",
           "a big mess": "mess", "a broken toy": "broken"}

_OPENINGS = ["Once upon a time, there was {intro}.", "Once upon a time, in a small town, there lived {intro}.",
             "There was once {intro}.", "{Intro} lived in a little house near the {place}.",
             "Once upon a time, {intro} lived with {his} family.",]
_LIKES = ["{He} loved to {activity}.", "Every day, {he} liked to {activity}.",
          "{name} was very {trait} and loved to {activity}.", ""]


def _story(rng, kind=None, name=None, place=None, obj=None, problem=None):
    """One story -> (text, facts); `facts` holds the slots, for questions about the story."""
    hero = _character(rng, kind, name)
    friend = _character(rng)
    while friend["name"] == hero["name"]:
        friend = _character(rng)
    if problem is None:
        problem = rng.choice([p for p in sorted(_PROBLEMS)
                              if place is None or place in _PROBLEMS[p].get("places", [place])])
    place = place or rng.choice(_PROBLEMS[problem].get("places", [p[0] for p in _PLACES]))
    place, to_place, at_place = next(p for p in _PLACES if p[0] == place)
    adult = rng.choice(_ADULTS)
    color = rng.choice(_COLORS)
    obj = obj or rng.choice(_OBJECTS)
    slots = dict(hero, Intro=hero["intro"][0].upper() + hero["intro"][1:],
                 fname=friend["name"], friend_intro=friend["intro"], **_pronouns(friend["he"], "f"),
                 adult=adult, he2="he" if adult in ("dad", "grandpa") else "she",
                 place=place, to_place=to_place, at_place=at_place, obj=obj, color=color, a_obj=_a(color) + " " + obj,
                 high=rng.choice(_HIGH), spot=rng.choice(_SPOTS), fear=rng.choice(_FEARS),
                 small=rng.choice(_SMALL_ANIMALS), food=rng.choice(_FOODS), gift=rng.choice(_GIFTS))
    slots["activity"] = rng.choice(_ACTIVITIES).format(**slots)
    beats = [rng.choice(alternatives) for alternatives in _PROBLEMS[problem]["beats"]]
    paragraphs, friend_known = [], False
    for templates in ([rng.choice(_OPENINGS), rng.choice(_LIKES)], beats[:3], beats[3:]):
        sentences = []
        for t in templates:
            if "{friend_intro}" in t:      # the long "a kind dog named Spot" only at the first mention
                t = t.replace("{friend_intro}", "{fname}") if friend_known else t
                friend_known = True
            elif "{fname}" in t and not friend_known:
                sentences.append("{name} had a good friend, {friend_intro}.".format(**slots))
                friend_known = True
            if t:
                t = t.format(**slots)
                sentences.append(t[0].upper() + t[1:])  # "{friend_intro} saw..." starts a sentence
        paragraphs.append(" ".join(sentences))
    facts = dict(slots, problem=problem, lesson=_PROBLEMS[problem]["lesson"], friend_known=friend_known,
                 qa=[(q.format(**slots), a.format(**slots)) for q, a in _PROBLEMS[problem]["qa"]])
    return "\n\n".join(paragraphs), facts


def builtin_stories(n, seed=0):
    """`n` distinct generated stories (deterministic in `seed`)."""
    rng, seen, stories = random.Random(seed), set(), []
    while len(stories) < n:
        text, _ = _story(rng)
        if text not in seen:
            seen.add(text)
            stories.append(text)
    return stories


# Conversations. Each turn kind: (user phrasings, assistant phrasings), chosen independently.
_SYSTEMS = [DEFAULT_SYSTEM] * 6 + [None, "You are Wyrd, a friendly assistant who tells stories to children.",
                                   "You are a helpful assistant.", "You are Wyrd. Answer kindly and simply.",
                                   "You are Wyrd, a small language model that loves stories."]
_GREETINGS = (["Hi!", "Hello!", "Hey!", "Hi there!", "Hello, Wyrd!", "Good morning!", "Hey Wyrd!", "Hello there."],
              ["Hello! How can I help you today?", "Hi! Would you like to hear a story?",
               "Hello! I am Wyrd. What would you like to talk about?", "Hi there! It is nice to meet you.",
               "Hello! I can tell you a story or answer a simple question."])
_HOW_ARE_YOU = (["How are you?", "How are you today?", "Hi Wyrd, how are you doing?"],
                ["I am doing well, thank you! How can I help you?", "I am happy today. Would you like a story?",
                 "I am fine, thank you for asking! What would you like to do?"])
_IDENTITY = (["Who are you?", "What is your name?", "What are you?", "Tell me about yourself.",
              "Are you a person?", "What can you do?"],
             ["I am Wyrd, a small AI assistant. I like to tell stories and answer simple questions.",
              "My name is Wyrd. I am an AI assistant, and I know many stories about children and animals.",
              "I am Wyrd, a helpful AI assistant. I am not a person, but I can tell you a story.",
              "I am Wyrd! I can tell stories, answer questions about them, and talk about simple things."])
_THANKS = (["Thank you!", "Thanks!", "Thank you, Wyrd.", "That was a nice story, thank you.", "Thanks, I liked that!"],
           ["You're welcome!", "You are welcome! I am glad you liked it.", "I'm happy I could help!",
            "You're welcome! Would you like another story?"])
_GOODBYE = (["Bye!", "Goodbye!", "Good night!", "See you later!", "I have to go now. Bye!"],
            ["Goodbye! Have a wonderful day.", "Bye! Come back soon for another story.",
             "Good night! Sleep well.", "See you later! Take care."])
_UNKNOWN = (["What is the capital of France?", "Can you help me with my taxes?", "What is the square root of 2?",
             "Who won the game last night?", "What is the weather like today?", "Can you write a computer program?"],
            ["I am sorry, I do not know that. I am a small model, and I only know simple things. "
             "Would you like a story instead?",
             "I don't know the answer to that. I know a lot of stories, though! Shall I tell you one?",
             "That is a hard question for me. I am a small assistant that knows stories and simple facts."])
# (question, answer) pairs about the world the stories live in
_FACTS = ([(f"What sound does a {a} make?", f"A {a} says \"{s}\".") for a, s in
           [("cat", "meow"), ("dog", "woof"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"), ("pig", "oink"),
            ("owl", "hoot"), ("horse", "neigh"), ("frog", "ribbit"), ("mouse", "squeak"), ("lion", "roar")]]
          + [(f"What do {a} like to eat?", f"{a.capitalize()} like to eat {f}.") for a, f in
             [("bunnies", "carrots"), ("mice", "cheese"), ("monkeys", "bananas"), ("cows", "grass"),
              ("birds", "seeds"), ("dogs", "bones"), ("cats", "fish"), ("bears", "honey"), ("squirrels", "nuts")]]
          + [(f"Where do {a} live?", f"{a.capitalize()} live {w}.") for a, w in
             [("fish", "in the water"), ("birds", "in nests in the trees"), ("bees", "in a hive"),
              ("frogs", "in ponds"), ("bears", "in the forest"), ("cows", "on a farm")]]
          + [(f"What color is {t}?", f"{t[0].upper() + t[1:]} is {c}.") for t, c in
             [("the sky", "blue"), ("grass", "green"), ("the sun", "yellow"), ("snow", "white"), ("a banana", "yellow"),
              ("a carrot", "orange"), ("a strawberry", "red"), ("a cloud", "white")]]
          + [(f"How many legs does {a} have?", f"{a[0].upper() + a[1:]} has {n} legs.") for a, n in
             [("a dog", "four"), ("a cat", "four"), ("a bird", "two"), ("a duck", "two"), ("a spider", "eight"),
              ("an ant", "six"), ("a cow", "four"), ("a horse", "four")]]
          + [("What do you wear when it is cold?", "When it is cold, you wear a warm coat, a hat and a scarf."),
             ("What do plants need to grow?", "Plants need water, sun and good soil to grow."),
             ("Is the sun hot?", "Yes, the sun is very hot. It keeps us warm."),
             ("When do we sleep?", "We sleep at night, when it is dark."),
             ("How many days are in a week?", "There are seven days in a week."),
             ("What comes after Monday?", "Tuesday comes after Monday."),
             ("What is the opposite of big?", "The opposite of big is small."),
             ("What is the opposite of hot?", "The opposite of hot is cold."),
             ("Why do we need an umbrella?", "We use an umbrella to stay dry when it rains."),
             ("What makes a rainbow?", "A rainbow comes when the sun shines through drops of rain.")])
_STORY_ASK = ["Tell me a story{about}.", "Can you tell me a story{about}?", "Please tell me a story{about}.",
              "I want to hear a story{about}.", "Tell me a short story{about}.",
              "Could you tell me a bedtime story{about}?",
              "Write a story{about}."]
_STORY_LEAD = ["", "", "Sure! ", "Of course! Here is a story{about}.\n\n", "Here is a story{about}.\n\n",
               "Okay! Here is a short story.\n\n"]


def _story_turn(rng):
    """A story request with a random topic -> (user, assistant, facts)."""
    topic = rng.choice(["none", "none", "kind", "name", "place", "theme", "object"])
    if topic == "kind":
        kind = rng.choice(_ANIMALS + _TOYS + ["girl", "boy"])
        about, args = " about " + _a(kind), dict(kind=kind)
    elif topic == "name":
        name = rng.choice(_GIRLS + _BOYS)
        about, args = f" about a {'girl' if name in _GIRLS else 'boy'} named {name}", dict(name=name)
    elif topic == "place":
        place = rng.choice(_PLACES)
        about, args = rng.choice([f" about the {place[0]}", f" that happens {place[2]}"]), dict(place=place[0])
    elif topic == "theme":
        theme = rng.choice(sorted(_THEMES))
        about, args = f" about {theme}", dict(problem=_THEMES[theme])
    elif topic == "object":
        obj = rng.choice(_OBJECTS)
        about, args = f" about a lost {obj}", dict(obj=obj, problem="lost")
    else:
        about, args = "", {}
    text, facts = _story(rng, **args)
    return rng.choice(_STORY_ASK).format(about=about), rng.choice(_STORY_LEAD).format(about=about) + text, facts


def _story_questions(rng, facts):
    """(question, answer) pairs about a story just told."""
    f = facts
    pool = list(f["qa"]) + [
        (rng.choice(["Who is the story about?", "Who is in the story?"]), f"The story is about {f['intro']}."),
        (f"What is the name of the {f['kind']}?", f"The {f['kind']}'s name is {f['name']}."),
        (rng.choice([f"What did {f['name']} learn?", "What is the lesson of the story?"]),
         f"{f['name']} learned {f['lesson']}.")]
    if f["friend_known"]:
        pool.append((f"Who is {f['fname']}?", f"{f['fname']} is {f['friend_intro']}, {f['name']}'s friend."))
    return rng.sample(pool, rng.choice([1, 1, 2]))


def _chat(rng):
    system = rng.choice(_SYSTEMS)
    msgs = [dict(role="system", content=system)] if system else []

    def say(pair):
        msgs.extend([dict(role="user", content=rng.choice(pair[0])),
                     dict(role="assistant", content=rng.choice(pair[1]))])

    if rng.random() < 0.3:
        say(_GREETINGS if rng.random() < 0.7 else _HOW_ARE_YOU)
    main = rng.choices(["story", "facts", "identity", "unknown"], weights=[50, 25, 15, 10])[0]
    if main == "story":
        user, reply, facts = _story_turn(rng)
        say(([user], [reply]))
        if rng.random() < 0.6:
            for q, a in _story_questions(rng, facts):
                say(([q], [a]))
    elif main == "facts":
        for q, a in rng.sample(_FACTS, rng.choice([1, 1, 2, 3])):
            say(([q], [a]))
    else:
        say(_IDENTITY if main == "identity" else _UNKNOWN)
    if rng.random() < 0.3:
        say(_THANKS)
    if rng.random() < 0.2:
        say(_GOODBYE)
    return msgs


def builtin_chats(n, seed=0):
    """`n` generated ChatML conversations (lists of {"role", "content"}), deterministic in `seed`."""
    rng = random.Random(seed)
    return [_chat(rng) for _ in range(n)]


# ----------------------------------------------------------------------------
# Real data. Each loader streams its file and yields plain Python objects (a
# story string; a conversation as a list of {"role", "content"}), so a
# multi-gigabyte corpus never sits in memory.

EOT = "<|endoftext|>"
ROLES = ("system", "user", "assistant")
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


class DataError(ValueError):
    """Unusable input data; the message names the file and what was expected."""


class _Skips:
    """Malformed records of one file: the first few are reported, then the total."""
    SHOW = 3

    def __init__(self, where):
        self.where, self.count = where, 0

    def __call__(self, at, why):
        self.count += 1
        if self.count <= self.SHOW:
            print(f"warning: {self.where}:{at}: skipped malformed record: {why}", file=sys.stderr)

    def report(self):
        if self.count:
            print(f"warning: {self.where}: skipped {self.count} malformed record(s) in all", file=sys.stderr)


def _open(path, mode="rt"):
    """Open a file for reading, gunzipping `.gz`; text is UTF-8."""
    encoding = "utf-8" if "t" in mode else None
    try:
        if str(path).endswith(".gz"):
            return gzip.open(path, mode, encoding=encoding)
        return open(path, mode, encoding=encoding)
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None


def _reading(path, records):
    """Re-raise decoding and archive errors met while streaming `records` as one DataError."""
    try:
        yield from records
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a chunk)") from None
    except (EOFError, OSError, tarfile.TarError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt or truncated file ({e})") from None


def iter_stories(path):
    """Stories of a TinyStories file: .txt[.gz] separated by <|endoftext|>, a .json[.gz]
    shard (a list of {"story": ...}), or TinyStories_all_data.tar.gz (a tar of shards)."""
    name = os.path.basename(path).lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        stories = _tar_stories(path)
    elif name.endswith((".json", ".json.gz")):
        stories = _shard_stories(_open(path, "rb"), path)
    elif name.endswith((".txt", ".txt.gz")):
        stories = _txt_stories(path)
    else:
        raise DataError(f"{path}: unrecognised story file; expected .txt (stories separated by {EOT}), "
                        f".json (a list of {{\"story\": ...}}) or a .tar.gz of such .json shards, optionally .gz")
    n = 0
    for story in _reading(path, stories):
        n += 1
        yield story
    if n == 0:
        raise DataError(f"{path}: no stories in this file (empty, or not in the expected format)")


def _txt_stories(path):
    with _open(path) as f:
        lines = []
        for line in f:
            while EOT in line:  # usually alone on its line, but it may sit inside one
                head, line = line.split(EOT, 1)
                story = ("".join(lines) + head).strip()
                lines = []
                if story:
                    yield story
            lines.append(line)
        story = "".join(lines).strip()
        if story:
            yield story


def _shard_stories(f, where):
    skips = _Skips(where)
    with f:
        for i, obj in enumerate(_json_array(f, where)):
            story = obj.get("story") if isinstance(obj, dict) else None
            if not isinstance(story, str):
                skips(f"element {i}", "expected an object with a string 'story' field")
            elif story.strip():
                yield story.strip()
    skips.report()


def _tar_stories(path):
    try:
        tar = tarfile.open(path, "r|*")  # streaming: one member after the other
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e})") from None
    with tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                yield from _shard_stories(tar.extractfile(member), f"{path}:{member.name}")


def _json_array(f, where, chunk=1 << 20):
    """The elements of a JSON array, parsed one at a time from a binary stream, so an
    80 MB shard is never held whole (json.load would also build every object at once)."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buf, pos, offset, eof = "", 0, 0, False   # offset: characters of the file before buf

    def fill():
        nonlocal buf, pos, offset, eof
        raw = f.read(chunk)
        offset += pos
        buf, pos, eof = buf[pos:] + utf8.decode(raw, final=not raw), 0, not raw

    def peek():  # next non-space character, "" at the end of the file
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos].isspace():
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos:pos + 1]
            fill()

    if peek() != "[":
        raise DataError(f"{where}: expected a JSON array of story objects, found {peek()!r} at the start")
    pos += 1
    if peek() == "]":
        return
    while True:
        peek()  # raw_decode does not skip leading whitespace
        try:
            obj, end = decoder.raw_decode(buf, pos)
            if end == len(buf) and not eof:  # a number cut by the chunk edge could still grow
                raise json.JSONDecodeError("cut", buf, end)
        except json.JSONDecodeError as e:
            if eof:
                raise DataError(f"{where}: invalid JSON at character {offset + e.pos}: {e.msg}") from None
            fill()
            continue
        except RecursionError:
            raise DataError(f"{where}: invalid JSON after character {offset + pos}: nested too deeply") from None
        pos = end
        yield obj
        c = peek()
        if c == "]":
            return
        if c != ",":
            raise DataError(f"{where}: invalid JSON at character {offset + pos}: expected ',' or ']', found {c!r}")
        pos += 1


def _jsonl(path, skips):
    """(line number, object) for each JSON-object line of a JSONL file; bad lines go to `skips`."""
    with _open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if n == 1 and line.lstrip()[:1] == b"[":
                raise DataError(f"{path}: this is a JSON array; expected JSONL (one JSON object per line)")
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nested too deep
                skips(n, f"not valid JSON ({e})")
                continue
            if not isinstance(obj, dict):
                skips(n, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield n, obj


def iter_chats(path, lang="en"):
    """Conversations of a chat file, each a list of {"role", "content"} ending on an
    assistant turn. The format is recognised from the first record: {"messages": [...]},
    an OASST tree ({"prompt": {..., "replies": [...]}}) or an OASST message (parent_id).
    OASST messages in another language than `lang` (None: any) are dropped."""
    skips = _Skips(path)
    records = _reading(path, _jsonl(path, skips))
    first = next(records, None)
    if first is None:
        raise DataError(f"{path}: no JSON lines in this file; expected chat JSONL "
                        "({\"messages\": [...]} per line, or OASST messages or trees)")
    records = _chain([first], records)
    line, obj = first
    if "messages" in obj:
        chats = _plain_chats(records, skips)
    elif isinstance(obj.get("prompt"), dict):
        chats = _tree_chats(records, skips, lang)
    elif "message_id" in obj and "parent_id" in obj:
        chats = _message_chats(records, skips, lang, path)
    else:
        raise DataError(f"{path}:{line}: unrecognised chat record with keys {sorted(obj)[:8]}; expected "
                        "'messages' (chat JSONL), 'prompt' (OASST trees) or 'message_id' + 'parent_id' "
                        "(OASST messages)")
    n = 0
    for chat in chats:
        n += 1
        yield chat
    skips.report()
    if n == 0:
        raise DataError(f"{path}: no usable conversation (one that ends on an assistant turn"
                        + (f", in language {lang!r}" if lang else "") + ")")


def _chain(*iterables):
    for it in iterables:
        yield from it


def _plain_chats(records, skips):
    for n, obj in records:
        msgs = obj.get("messages")
        if not (isinstance(msgs, list) and all(isinstance(m, dict) and m.get("role") in ROLES
                                               and isinstance(m.get("content"), str) for m in msgs)):
            skips(n, "expected 'messages': a list of {'role': system|user|assistant, 'content': string}")
            continue
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        while msgs and msgs[-1]["role"] != "assistant":  # nothing to learn after the last reply
            msgs.pop()
        if msgs:
            yield msgs
        else:
            skips(n, "no assistant message")


def _tree_chats(records, skips, lang):
    for n, obj in records:
        try:
            chats = flatten_oasst(obj["prompt"], lang)
        except (KeyError, TypeError, ValueError) as e:
            skips(n, f"bad OASST tree: {e}")
            continue
        yield from chats


def _message_chats(records, skips, lang, path):
    """Rebuild the trees of a flat OASST message list from parent_id links, then flatten them."""
    nodes = {}
    for n, m in records:
        if not (isinstance(m.get("message_id"), str) and m.get("role") in OASST_ROLES
                and isinstance(m.get("text"), str)):
            skips(n, "expected an OASST message with 'message_id', 'parent_id', 'role' (prompter|assistant) and 'text'")
            continue
        if not (m.get("parent_id") is None or isinstance(m.get("parent_id"), str)):
            skips(n, f"parent_id must be a string or null, got {type(m['parent_id']).__name__}")
            continue
        if m["message_id"] in nodes:
            skips(n, f"duplicate message_id {m['message_id'][:40]!r}: the first one is kept")
            continue
        node = {k: m.get(k) for k in ("role", "text", "lang", "rank", "deleted", "review_result", "parent_id")}
        node["replies"] = []
        nodes[m["message_id"]] = node
    roots, orphans = [], 0
    for node in nodes.values():  # dicts keep file order, so replies keep it too
        parent = node["parent_id"]
        if parent is None:
            roots.append(node)
        elif parent in nodes:
            nodes[parent]["replies"].append(node)
        else:
            orphans += 1
    if orphans:
        print(f"note: {path}: {orphans} message(s) whose parent is not in the file were dropped", file=sys.stderr)
    for root in roots:
        yield from flatten_oasst(root, lang)


def flatten_oasst(prompt, lang="en"):
    """Conversations of one OASST tree, root to leaf.

    At every assistant turn only the best reply is followed (lowest `rank`; unranked
    replies come after ranked ones, ties keep file order); every user reply to it
    is followed, so a tree gives one conversation per distinct user branch. Deleted
    messages, `review_result: false` and messages in another language are dropped
    with their subtrees. Each conversation ends on an assistant turn.
    """
    chats = []

    def usable(m, role):
        if not (isinstance(m, dict) and m.get("role") in OASST_ROLES and isinstance(m.get("text"), str)
                and isinstance(m.get("replies", []), list)):
            raise ValueError(f"message {str(m)[:60]!r}: expected 'role' (prompter|assistant), 'text' "
                             "and a 'replies' list")
        return (m["role"] == role and not m.get("deleted") and m.get("review_result") is not False
                and (lang is None or m.get("lang") == lang) and m["text"].strip() != "")

    def rank(m):
        r = m.get("rank")
        ranked = isinstance(r, (int, float)) and not isinstance(r, bool)
        return (0, r) if ranked else (1, 0)

    def best_answer(user):
        answers = [m for m in user.get("replies", []) if usable(m, "assistant")]
        return min(answers, key=rank) if answers else None

    # depth first with a stack, not recursion: a chain of thousands of turns is valid data
    stack = [(prompt, [])] if usable(prompt, "prompter") else []
    while stack:
        user, before = stack.pop()
        best = best_answer(user)
        if best is None:
            continue
        chat = before + [{"role": "user", "content": user["text"].strip()},
                         {"role": "assistant", "content": best["text"].strip()}]
        follow = [m for m in best.get("replies", []) if usable(m, "prompter") and best_answer(m) is not None]
        if not follow:  # no user turn continues it: this is a leaf conversation
            chats.append(chat)
        stack.extend((m, chat) for m in reversed(follow))  # reversed: popped in file order
    return chats


def write_chats(path, chats):
    """Write conversations as {"messages": [...]} JSONL (gzipped for .gz), atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    n = 0
    try:
        with (gzip.open(tmp, "wt", encoding="utf-8") if str(path).endswith(".gz")
              else open(tmp, "w", encoding="utf-8")) as f:
            for chat in chats:
                f.write(json.dumps({"messages": chat}, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


# ----------------------------------------------------------------------------
# Tokenised data, cached. A source is a file path or `builtin[:N]` (N generated
# stories or conversations). Its tokens are written once as a raw memmap,
# `{source}.{key}.tok.u16` (u32 for vocabularies over 65536) with a JSON
# sidecar, where the key hashes the data (name, size, mtime; for the built-in
# corpus, its text) and the tokenizer. Every document ends with <|endoftext|>.
# Chat caches hold two columns: token id and loss mask.

def _builtin_count(source, default):
    """`builtin` -> default, `builtin:N` -> N, a path -> None."""
    if source == "builtin":
        return default
    if source.startswith("builtin:"):
        n = source.split(":", 1)[1]
        if not n.isdigit() or int(n) < 2:
            raise DataError(f"{source}: expected builtin:N with N >= 2 documents")
        return int(n)
    return None


def _sha(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8") if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _cached(base, key, dtype, width, chunks):
    """Token array [n, width] at `{base}.{key}.tok.*`, built from chunks() on a miss.
    The data is written under a temporary name and renamed, then the sidecar: a
    sidecar therefore always describes a complete file."""
    ext = "u16" if dtype == np.uint16 else "u32"
    data_path, meta_path = f"{base}.{key}.tok.{ext}", f"{base}.{key}.tok.json"
    itemsize = np.dtype(dtype).itemsize
    try:
        with open(meta_path, encoding="utf-8") as f:
            n = int(json.load(f)["tokens"])
        if os.path.getsize(data_path) == n * width * itemsize and n > 0:
            return np.memmap(data_path, dtype=dtype, mode="r", shape=(n, width))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or a broken one: rebuild
    _remove_stale_temps(data_path)
    tmp, n = f"{data_path}.tmp{os.getpid()}", 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks():
                f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
                n += len(chunk)
        if n == 0:
            raise DataError(f"{base}: no tokens")
        os.replace(tmp, data_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _write_text(meta_path, json.dumps({"tokens": n, "columns": width, "dtype": ext, "key": key}))
    return np.memmap(data_path, dtype=dtype, mode="r", shape=(n, width))


def _remove_stale_temps(path):
    """Delete `path.tmpPID` files left by builds that were killed (their PID is gone)."""
    folder, prefix = os.path.dirname(os.path.abspath(path)), os.path.basename(path) + ".tmp"
    for name in os.listdir(folder):
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass  # alive, or not ours to ask about: leave it


def _write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _tokenize(source, tok, out_dir, chat, lang):
    """-> (tokens [n, width], key). width 1 for stories, 2 (id, mask) for chats."""
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    tok_key = _sha(tok.to_json())
    n_builtin = _builtin_count(source, DEFAULT_CHATS if chat else DEFAULT_STORIES)
    if n_builtin is not None:  # no source file: cache under the out dir
        docs = builtin_chats(n_builtin, seed=1) if chat else builtin_stories(n_builtin, seed=0)
        key = _sha("chats" if chat else "stories", json.dumps(docs), tok_key)
        bases = [os.path.join(out_dir, f"builtin-{'chats' if chat else 'stories'}-{n_builtin}")]
    else:
        try:
            st = os.stat(source)
        except OSError as e:
            raise DataError(f"{source}: cannot read ({e.strerror})") from None
        docs = None
        key = _sha("chats" if chat else "stories", os.path.basename(source), str(st.st_size),
                   str(st.st_mtime_ns), lang or "", tok_key)
        # beside the source, unless its folder is read-only (by its mode bits too: root
        # may write anywhere, but a folder without write bits is not ours to fill)
        folder = os.path.dirname(os.path.abspath(source))
        writable = os.access(folder, os.W_OK) and os.stat(folder).st_mode & 0o222
        bases = ([source] if writable else []) + [os.path.join(out_dir, os.path.basename(source))]

    def chunks(per=512):
        docs_ = docs if docs is not None else (iter_chats(source, lang) if chat else iter_stories(source))
        batch = []
        for doc in docs_:
            batch.append(doc)
            if len(batch) == per:
                yield _encode_chats(batch, tok) if chat else _encode_stories(batch, tok)
                batch = []
        if batch:
            yield _encode_chats(batch, tok) if chat else _encode_stories(batch, tok)

    os.makedirs(out_dir, exist_ok=True)
    for i, base in enumerate(bases):
        try:
            return _cached(base, key, dtype, 2 if chat else 1, chunks), key
        except PermissionError:
            if i == len(bases) - 1:
                raise


def _encode_stories(stories, tok):
    ids = tok.encode_batch(stories)
    flat = [t for doc in ids for t in doc + [tok.eot_id]]
    return np.asarray(flat, dtype=np.int64).reshape(-1, 1)


def _encode_chats(chats, tok):
    ids, mask = [], []
    for chat in chats:
        i, m = tok.render_chat(chat)
        ids += i + [tok.eot_id]  # conversations are separated like stories; the separator is not a target
        mask += m + [0]
    return np.stack([np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64)], axis=1)


def load_tokens(sources, tok, out_dir, chat=False, lang="en"):
    """Tokens of every source, each split into train and held-out parts at a document
    boundary: -> (train [n, w], val [m, w], key of the data + tokenizer)."""
    trains, vals, keys = [], [], []
    for source in sources:
        tokens, key = _tokenize(source, tok, out_dir, chat, lang)
        train, val = split_held_out(tokens, tok.eot_id)
        trains.append(train)
        vals.append(val)
        keys.append(key)
    if len(sources) == 1:
        return trains[0], vals[0], keys[0]
    return np.concatenate(trains), np.concatenate(vals), _sha(*keys)


def split_held_out(tokens, eot, fraction=VAL_FRACTION, cap=VAL_MAX_TOKENS):
    """The last `fraction` of the tokens (at least one, at most `cap`), cut after an
    <|endoftext|>; if the share lies inside the last document, cut inside it."""
    n = len(tokens)
    cut = n - max(min(int(n * fraction), cap), 1 if n > 1 else 0)
    ends = np.flatnonzero(tokens[cut:n - 1, 0] == eot)
    cut = cut + ends[0] + 1 if len(ends) else cut
    return tokens[:cut], tokens[cut:]


# ----------------------------------------------------------------------------
# Batches. A data set is a list of rows, each a slice of at most seq_len + 1
# tokens: inputs are its first tokens, targets the same shifted by one.
# Pretraining rows tile the token stream; fine-tuning rows pack whole
# conversations, so no row starts in the middle of someone else's question.
# Epoch e visits the rows in a permutation drawn from (seed, e): the batch of
# any step is a pure function of the step, so resuming needs only the position.

class Rows:
    def __init__(self, tokens, starts, lengths, seq_len, pad_id):
        self.tokens, self.starts, self.lengths = tokens, starts, lengths   # tokens [n, 1 or 2]
        self.seq_len, self.pad_id = seq_len, pad_id
        self._order = (None, None)

    @classmethod
    def stream(cls, tokens, seq_len, pad_id):
        """Consecutive windows of seq_len + 1 tokens, overlapping by one (or, from fewer
        tokens than that, one shorter row, padded)."""
        starts = np.arange(0, max(len(tokens) - 1, 0) // seq_len) * seq_len
        lengths = np.full(len(starts), seq_len + 1)
        if len(starts) == 0 and len(tokens) >= 2:
            starts, lengths = np.array([0]), np.array([len(tokens)])
        return cls(tokens, starts, lengths, seq_len, pad_id)

    @classmethod
    def packed(cls, tokens, seq_len, eot):
        """Whole conversations packed greedily into rows; a longer one is cut to fit.
        Rows without a single trained target are dropped."""
        if len(tokens) < 2:
            return cls(tokens, np.zeros(0, np.int64), np.zeros(0, np.int64), seq_len, eot)
        ends = np.flatnonzero(tokens[:, 0] == eot) + 1
        if len(ends) == 0 or ends[-1] != len(tokens):
            ends = np.append(ends, len(tokens))
        starts, lengths = [], []
        begin = 0
        for end in ends.tolist():
            if lengths and starts[-1] + lengths[-1] == begin and lengths[-1] + end - begin <= seq_len + 1:
                lengths[-1] += end - begin
            else:
                starts.append(begin)
                lengths.append(min(end - begin, seq_len + 1))
            begin = end
        starts, lengths = np.asarray(starts), np.asarray(lengths)
        trained = np.concatenate([[0], np.cumsum(tokens[:, 1], dtype=np.int64)])
        keep = trained[starts + lengths] - trained[starts + 1] > 0
        return cls(tokens, starts[keep], lengths[keep], seq_len, eot)

    def __len__(self):
        return len(self.starts)

    def batch(self, rows):
        """-> ids [B, T], targets [B, T], mask [B, T] (0 on padding and untrained tokens)."""
        B, T = len(rows), self.seq_len
        x = np.full((B, T), self.pad_id, dtype=np.int64)
        y = np.full((B, T), self.pad_id, dtype=np.int64)
        m = np.zeros((B, T), dtype=np.float32)
        for i, r in enumerate(rows):
            seg = self.tokens[self.starts[r]:self.starts[r] + self.lengths[r]]
            n = len(seg) - 1
            x[i, :n], y[i, :n] = seg[:-1, 0], seg[1:, 0]
            m[i, :n] = seg[1:, 1] if seg.shape[1] == 2 else 1
        return x, y, m

    def at(self, position, batch_size, seed):
        """Row indices of the batch_size sequences starting at `position` in the epoch order."""
        rows = []
        for g in range(position, position + batch_size):
            epoch, i = divmod(g, len(self))
            if self._order[0] != epoch:
                self._order = (epoch, np.random.default_rng([seed, epoch]).permutation(len(self)))
            rows.append(self._order[1][i])
        return rows


# ----------------------------------------------------------------------------
# Optimizer: AdamW (decoupled weight decay), as torch.optim.AdamW computes it.

def decays(name, p):
    """Weight decay on matrices only (projections, embedding): norms, biases and
    lambda_param are 1-D, h0 is [1, 1, d]."""
    return p.data.ndim == 2


class AdamW:
    def __init__(self, named_params, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8):
        self.params = list(named_params)
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.m = {n: np.zeros(p.shape, p.dtype) for n, p in self.params}   # first moment
        self.v = {n: np.zeros(p.shape, p.dtype) for n, p in self.params}   # second moment
        self.t = 0

    def step(self, lr):
        self.t += 1
        b1, b2 = self.betas
        bias1, bias2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for name, p in self.params:
            if p.grad is None:
                continue
            if not p.data.flags.c_contiguous:  # the kernel updates a flat view in place
                raise ValueError(f"AdamW: parameter {name} is not C-contiguous; update its data in place")
            decay = 1 - lr * self.weight_decay if decays(name, p) else 1.0
            f = p.data.dtype.type  # scalars in the parameters' precision: float32 stays SIMD
            adamw_kernel(p.data.reshape(-1), np.ascontiguousarray(p.grad).reshape(-1),
                         self.m[name].reshape(-1), self.v[name].reshape(-1), f(b1), f(1 - b1),
                         f(b2), f(1 - b2), f(decay), f(lr / bias1), f(math.sqrt(bias2)), f(self.eps))


@njit(parallel=True, cache=True, fastmath=FAST)
def adamw_kernel(p, g, m, v, b1, one_minus_b1, b2, one_minus_b2, decay, step, sqrt_bias2, eps):
    """One AdamW step over flat arrays in a single pass (NumPy would take ~14):
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    p = p decay - step m / (sqrt(v) / sqrt_bias2 + eps), with decay = 1 - lr wd
    and step = lr / (1 - b1^t): torch.optim.AdamW's update."""
    for i in prange(p.size):
        m[i] = b1 * m[i] + one_minus_b1 * g[i]
        v[i] = b2 * v[i] + one_minus_b2 * g[i] * g[i]
        p[i] = p[i] * decay - step * m[i] / (math.sqrt(v[i]) / sqrt_bias2 + eps)


@njit(parallel=True, cache=True, fastmath=FAST)
def sum_squares(x):
    """sum(x^2) accumulated in float64, in one pass (no float64 copy of x)."""
    total = 0.0
    for i in prange(x.size):
        total += np.float64(x[i]) * np.float64(x[i])
    return total


def lr_at(step, cfg):
    """Learning rate of optimizer step `step` (0-based): linear warmup to cfg.lr,
    then cosine decay reaching cfg.min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def clip_grad_norm(params, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm; -> the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = math.sqrt(sum(sum_squares(np.ascontiguousarray(g).reshape(-1)) for g in grads))
    if max_norm and norm > max_norm:
        for g in grads:
            g *= max_norm / (norm + 1e-6)
    return norm


# ----------------------------------------------------------------------------
# Training loop

class Diverged(RuntimeError):
    pass


def log_path_of(out):
    return os.path.splitext(out)[0] + ".jsonl"


def state_path_of(out):
    return os.path.splitext(out)[0] + ".train.safetensors"


def evaluate(model, rows, cfg, batches=None):
    """Mean loss over the first `batches` batches of rows, in order (the same every time)."""
    batches = cfg.eval_batches if batches is None else batches
    n = min(len(rows), batches * cfg.batch_size)
    if n == 0:
        return float("nan")
    losses, weights = [], []
    with no_grad():
        for i in range(0, n, cfg.batch_size):
            x, y, m = rows.batch(list(range(i, min(i + cfg.batch_size, n))))
            losses.append(float(model.loss(x, y, m).data))
            weights.append(float(m.sum()))
    return float(np.average(losses, weights=weights))


def bytes_per_token(tokens, tok):
    """Mean UTF-8 bytes of text per token, a special token (a document separator) as one
    byte: bits/byte = (nats/token) / ln 2 / bytes_per_token, independent of the tokenizer."""
    lengths = np.array([len(b) for b in tok.vocab])
    lengths[list(tok.special_ids.values())] = 1
    return float(lengths[np.asarray(tokens).reshape(-1)].mean()) if np.size(tokens) else float("nan")


def train(model, tok, rows, val_rows, cfg, out, phase, data_key, meta=None, resume=False, fresh_log=True):
    """Run optimizer steps up to cfg.steps, checkpointing every cfg.ckpt_every steps, at
    the end and on Ctrl-C (the step in progress is finished first). -> summary dict."""
    params = model.named_parameters()
    opt = AdamW(params, weight_decay=cfg.weight_decay)
    step = load_train_state(out, opt, phase, data_key) if resume else 0
    _trim_log(log_path_of(out), phase, step, keep_other_phases=resume or not fresh_log)
    meta = dict(meta or {}, phase=phase)

    stop = []

    def on_sigint(signum, frame):
        if stop:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop.append(signum)
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", flush=True)
    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
        previous = None

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    first, t_start, val_loss = step, time.time(), None
    print(f"{phase}: {model.num_params():,} parameters, {len(rows):,} train rows, {len(val_rows):,} held-out rows, "
          f"steps {step}..{cfg.steps} of {tokens_per_step:,} tokens")
    if len(val_rows) == 0:
        print(f"warning: {phase}: the data are too small to hold any out; held-out losses will read nan",
              file=sys.stderr)
    try:
        with open(log_path_of(out), "a", encoding="utf-8") as log:
            while step < cfg.steps and not stop:
                lr = lr_at(step, cfg)
                loss = 0.0
                for k in range(cfg.grad_accum):
                    position = (step * cfg.grad_accum + k) * cfg.batch_size
                    x, y, m = rows.batch(rows.at(position, cfg.batch_size, cfg.seed))
                    micro = model.loss(x, y, m)
                    value = float(micro.data)
                    if not math.isfinite(value):
                        raise Diverged(f"{phase} step {step + 1}: the loss is {value}. Stopping; the last good "
                                       f"checkpoint is kept at {out}. Try a lower --lr.")
                    (micro * (1.0 / cfg.grad_accum)).backward()
                    loss += value / cfg.grad_accum
                norm = clip_grad_norm(model.parameters(), cfg.grad_clip)
                if not math.isfinite(norm):
                    raise Diverged(f"{phase} step {step + 1}: the gradient norm is {norm}. Stopping; the last good "
                                   f"checkpoint is kept at {out}. Try a lower --lr.")
                opt.step(lr)
                for p in model.parameters():
                    p.grad = None
                step += 1

                elapsed = time.time() - t_start
                tok_s = (step - first) * tokens_per_step / max(elapsed, 1e-9)
                record = {"phase": phase, "step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                          "tokens_per_s": round(tok_s, 1), "elapsed": round(elapsed, 2)}
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    record["val_loss"] = val_loss = evaluate(model, val_rows, cfg)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if step % cfg.log_every == 0 or step in (first + 1, cfg.steps) or "val_loss" in record:
                    eta = (cfg.steps - step) * elapsed / (step - first)
                    print(f"{phase} step {step:5d}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                          f"{tok_s:,.0f} tok/s | elapsed {_hms(elapsed)} | ETA {_hms(eta)}"
                          + (f" | held-out {val_loss:.4f}" if "val_loss" in record else ""), flush=True)
                if step % cfg.ckpt_every == 0 and step < cfg.steps:
                    save_checkpoint(out, model, tok, opt, step, cfg, phase, data_key, meta)
            summary = {}
            if step >= cfg.steps:  # the end: losses of the final model, logged like a step
                final_batches = -(-FINAL_VAL_ROWS // cfg.batch_size)
                summary = {"phase": phase, "step": step, "train_loss": evaluate(model, rows, cfg),
                           "val_loss": evaluate(model, val_rows, cfg, final_batches)}
                n = min(len(val_rows), final_batches * cfg.batch_size)
                if phase == "pretrain" and n:  # the targets of the n evaluated rows (they tile the stream)
                    targets = val_rows.tokens[val_rows.starts[0] + 1:val_rows.starts[n - 1] + val_rows.lengths[n - 1]]
                    summary["val_bits_per_byte"] = summary["val_loss"] / math.log(2) / bytes_per_token(
                        targets[:, 0], tok)
                log.write(json.dumps(dict(summary, loss=summary["train_loss"], final=True)) + "\n")
                meta[phase] = summary
                print(f"{phase} done: held-out loss {summary['val_loss']:.4f} nats/token"
                      + (f" ({summary['val_bits_per_byte']:.4f} bits/byte)" if "val_bits_per_byte" in summary else "")
                      + f", train loss {summary['train_loss']:.4f}, {_hms(time.time() - t_start)}", flush=True)
            save_checkpoint(out, model, tok, opt, step, cfg, phase, data_key, meta)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    interrupted = bool(stop) and step < cfg.steps
    if interrupted:
        print(f"stopped at step {step}; continue with the same command and --resume")
    return dict(summary, interrupted=interrupted, step=step, meta=meta)


def _hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 \
        else f"{seconds // 60}m{seconds % 60:02d}s"


def _trim_log(path, phase, step, keep_other_phases):
    """Drop this phase's records after `step` (all of them for a fresh start, step 0), so
    a resumed run's log reads as if it had never stopped; other phases' records stay
    when asked (the default run logs both phases in one file)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if (r.get("phase") != phase and keep_other_phases) or (
                    r.get("phase") == phase and r.get("step", 0) <= step and not r.get("final")):
                keep.append(line)
    _write_text(path, "".join(keep))


# ----------------------------------------------------------------------------
# Checkpoints. `out` holds the model and tokenizer only (a spec safetensors file
# that a PyTorch Chimera loads strictly); the sibling `.train.safetensors` holds
# what resuming needs: the AdamW moments, the step and the data order (seed and
# position: the order is a pure function of them, so they are the RNG state).
# The pair is replaced in three atomic moves: the old train state is set aside
# (`.train.prev.safetensors`), the new one written, then the new model; so a kill
# at any instant leaves a model and a train state of the same step on disk.

def prev_state_path_of(out):
    return os.path.splitext(out)[0] + ".train.prev.safetensors"


def save_checkpoint(out, model, tok, opt, step, cfg, phase, data_key, meta):
    state = {"phase": phase, "step": step, "adam_t": opt.t, "config": asdict(cfg), "data_key": data_key,
             "data_position": step * cfg.grad_accum * cfg.batch_size, "data_seed": cfg.seed}
    tensors = {f"m.{n}": m for n, m in opt.m.items()}
    tensors.update({f"v.{n}": v for n, v in opt.v.items()})
    path, prev = state_path_of(out), prev_state_path_of(out)
    if os.path.exists(path) and os.path.exists(out):
        os.replace(path, prev)  # the old pair stays whole: old model + prev
    wyrd.write_safetensors(path, tensors, {"wyrd_train_state": json.dumps(state)})
    wyrd.save(out, model, tok, **dict(meta, step=step, steps=cfg.steps))
    if os.path.exists(prev):
        os.remove(prev)


def read_train_state(out):
    """-> (tensors, state) of the train state whose step is the model checkpoint's. After
    a save cut short that is `.train.prev.safetensors`, which is put back in place."""
    path, prev = state_path_of(out), prev_state_path_of(out)
    if not os.path.exists(path) and not os.path.exists(prev):
        raise wyrd.CheckpointError(f"{path}: no training state to resume from (run without --resume to start)")
    try:
        model_step = json.loads(wyrd.read_safetensors(out, data=False)[1].get("meta", "{}")).get("step")
    except (ValueError, AttributeError, RecursionError):
        raise wyrd.CheckpointError(f"{out}: bad __metadata__['meta']; cannot tell which step it holds") from None
    steps = {}
    for candidate in (path, prev):
        if os.path.exists(candidate):
            tensors, metadata = wyrd.read_safetensors(candidate)
            try:
                state = json.loads(metadata["wyrd_train_state"])
            except (KeyError, ValueError, RecursionError):
                raise wyrd.CheckpointError(f"{candidate}: not a Wyrd training state (no wyrd_train_state "
                                           "metadata)") from None
            if state.get("step") == model_step:
                if candidate == prev:
                    os.replace(prev, path)
                return tensors, state
            steps[candidate] = state.get("step")
    raise wyrd.CheckpointError(f"{out} is at step {model_step} but " + " and ".join(
        f"{p} at step {s}" for p, s in steps.items()) + ": the pair cannot be resumed exactly")


def load_train_state(out, opt, phase, data_key):
    """Restore the optimizer moments; -> the step to continue from (the model checkpoint's)."""
    tensors, state = read_train_state(out)
    path = state_path_of(out)
    if state["phase"] != phase:
        raise wyrd.CheckpointError(f"{path}: the saved run is a {state['phase']} run, not {phase}")
    if state["data_key"] != data_key:
        raise wyrd.CheckpointError(f"{path}: the data or tokenizer differ from the saved run's; "
                                   "resume with the same --data (files unchanged)")
    for name, p in opt.params:
        for moments, prefix in ((opt.m, "m."), (opt.v, "v.")):
            saved = tensors.get(prefix + name)
            if saved is None or saved.shape != p.data.shape:
                raise wyrd.CheckpointError(f"{path}: optimizer state for {name} is missing or has the wrong shape")
            moments[name][...] = saved
    opt.t = state["adam_t"]
    return state["step"]


def resume_config(out, given):
    """The saved run's TrainConfig. Flags given again must agree, except --steps (to extend a run)."""
    _, state = read_train_state(out)
    saved = TrainConfig(**state["config"])
    for name, value in given.items():
        if value is not None and name != "steps" and value != getattr(saved, name):
            raise wyrd.CheckpointError(f"--{name.replace('_', '-')} {value} differs from the saved run's "
                                       f"{getattr(saved, name)}; a resumed run keeps its settings")
    return replace(saved, steps=given.get("steps") or saved.steps), state["phase"]


# ----------------------------------------------------------------------------
# Samples and the reply check, with chat.py's sampler (the spec's defaults:
# temperature 0.7, top-k 50, top-p 0.9, repetition penalty 1.1), so the
# numbers printed here are what a user of chat.py sees.

def reply_check(model, tok, n=50, max_new=200, seed=HELD_OUT_SEED):
    """Answer the first user turn of n held-out built-in conversations; -> (share of replies
    that end with <|im_end|> within max_new tokens, [(messages, reply text)])."""
    settings, rng = Settings(max_tokens=max_new), np.random.default_rng(seed)
    ended, shown = 0, []
    for chat in builtin_chats(n, seed=seed):
        prompt = chat[:next(i for i, m in enumerate(chat) if m["role"] == "assistant")]
        ids, _ = tok.render_chat(prompt, add_generation_prompt=True)
        out = list(generate(model, tok, None, ids, settings, rng))
        ended += out[-1] == tok.im_end_id
        shown.append((prompt, tok.decode([t for t in out if t not in (tok.im_end_id, tok.eot_id)])))
    return ended / n, shown


def sample_stories(model, tok, n=3, max_new=300, seed=0):
    starts = ["Once upon a time", "One day, a little", "There was once"]
    settings, rng = Settings(max_tokens=max_new), np.random.default_rng(seed)
    return [starts[i % 3] + "".join(complete(model, tok, starts[i % 3], settings, rng)) for i in range(n)]


_NAME_RE = re.compile(r"\b(?:" + "|".join(sorted(set(_GIRLS + _BOYS + _PET_NAMES))) + r")\b")


def names_per_story(stories):
    """Mean number of distinct character names (from the corpus's name lists) per story:
    the built-in stories have 1.6 (a hero, sometimes a named friend); a model that
    forgets who its story is about introduces new ones."""
    return float(np.mean([len(set(_NAME_RE.findall(s))) for s in stories]))


def fact_check(model, tok, max_new=40):
    """Greedy replies (argmax, no repetition penalty) to the built-in corpus's world facts,
    asked with the default system prompt; -> (number answered exactly, [(question, reply)]
    of the others)."""
    right, wrong = 0, []
    for question, answer in _FACTS:
        ids, _ = tok.render_chat([{"role": "system", "content": DEFAULT_SYSTEM},
                                  {"role": "user", "content": question}], add_generation_prompt=True)
        out = list(generate(model, tok, None, ids, Settings(temperature=0, repetition_penalty=1, max_tokens=max_new)))
        reply = tok.decode([t for t in out if t not in (tok.im_end_id, tok.eot_id)])
        if reply == answer and out[-1] == tok.im_end_id:
            right += 1
        else:
            wrong.append((question, reply))
    return right, wrong


# ----------------------------------------------------------------------------
# Commands

def train_tokenizer(texts, vocab_size):
    t0 = time.time()
    tok = Tokenizer.train(texts, vocab_size)
    print(f"tokenizer: {tok.vocab_size} tokens, trained in {time.time() - t0:.1f}s")
    return tok


def tokenizer_texts(sources, chat=False, max_chars=20_000_000):
    """The first max_chars characters of the data (split evenly over the sources), to
    train the tokenizer on; a chat turn is given as "role\\n content", as ChatML shows it."""
    budget = max_chars // len(sources)
    for source in sources:
        n = _builtin_count(source, DEFAULT_CHATS if chat else DEFAULT_STORIES)
        if n is not None:
            docs = builtin_chats(n, seed=1) if chat else builtin_stories(n, seed=0)
        else:
            docs = iter_chats(source, lang=None) if chat else iter_stories(source)
        used = 0
        for doc in docs:
            for text in ([f"{m['role']}\n{m['content']}" for m in doc] if chat else [doc]):
                used += len(text)
                yield text
            if used >= budget:
                break


def load_tokenizer(path):
    """A tokenizer.json, or the tokenizer inside a Wyrd checkpoint."""
    if path.endswith(".safetensors"):
        tok = wyrd.load(path)[1]
        if tok is None:
            raise wyrd.CheckpointError(f"{path}: this checkpoint holds no tokenizer")
        return tok
    return Tokenizer.load(path)


def _check_seq_len(cfg, config):
    if cfg.seq_len > config.max_seq_len:
        raise DataError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")


def _out_dir(out):
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def pretrain(data, out, preset="tiny", tokenizer=None, cfg=PRETRAIN, resume=False, tok=None):
    """Pretrain on stories packed into one stream; trains a tokenizer unless one is given."""
    out_dir = _out_dir(out)
    if resume:
        model, tok, meta = wyrd.load(out)
    else:
        _check_seq_len(cfg, wyrd.get_config(preset))
        if tok is None and tokenizer:
            tok = load_tokenizer(tokenizer)
        elif tok is None:  # the role names too, so ChatML headers stay short when fine-tuning
            tok = train_tokenizer(_chain(tokenizer_texts(data), ["system user assistant"] * 100),
                                  wyrd.get_config(preset).vocab_size)
        model = wyrd.Chimera(replace(wyrd.get_config(preset), vocab_size=tok.vocab_size), seed=cfg.seed)
        meta = {"preset": preset}
    train_tokens, val_tokens, key = load_tokens(data, tok, out_dir)
    rows = Rows.stream(train_tokens, cfg.seq_len, tok.eot_id)
    val_rows = Rows.stream(val_tokens, cfg.seq_len, tok.eot_id)
    if len(rows) == 0:
        raise DataError(f"{', '.join(data)}: {len(train_tokens)} training tokens, not enough for one "
                        f"sequence of --seq-len {cfg.seq_len}")
    result = train(model, tok, rows, val_rows, cfg, out, "pretrain", key, dict(meta, data=list(data)), resume)
    return model, tok, result


def finetune(data, init, out, cfg=FINETUNE, resume=False, lang="en", model=None, tok=None, meta=None,
             fresh_log=True):
    """Fine-tune on conversations; only assistant tokens (and their <|im_end|>) are trained."""
    out_dir = _out_dir(out)
    if resume:
        model, tok, meta = wyrd.load(out)
    elif model is None:
        if not init:
            raise DataError("finetune needs --init CHECKPOINT (a pretrained model), or --resume")
        model, tok, meta = wyrd.load(init)
        if tok is None:
            raise wyrd.CheckpointError(f"{init}: this checkpoint holds no tokenizer")
    _check_seq_len(cfg, model.config)
    train_tokens, val_tokens, key = load_tokens(data, tok, out_dir, chat=True, lang=lang)
    rows = Rows.packed(train_tokens, cfg.seq_len, tok.eot_id)
    val_rows = Rows.packed(val_tokens, cfg.seq_len, tok.eot_id)
    if len(rows) == 0:
        raise DataError(f"{', '.join(data)}: no conversation with an assistant reply within --seq-len {cfg.seq_len}")
    meta = dict(meta or {}, finetune_data=list(data))
    result = train(model, tok, rows, val_rows, cfg, out, "finetune", key, meta, resume, fresh_log)
    return model, tok, result


def run_default(out="out/wyrd.safetensors", resume=False, preset="tiny", pre=PRETRAIN, ft=FINETUNE,
                stories="builtin", chats="builtin", check=50):
    """Tokenizer, pretraining and fine-tuning on the built-in corpus, then a report."""
    t0 = time.time()
    phase = read_train_state(out)[1]["phase"] if resume else None
    if phase == "pretrain":
        pre = resume_config(out, {})[0]
    if phase != "finetune":
        tok = None
        if not resume:  # one vocabulary for stories and ChatML (role names included)
            tok = train_tokenizer(_chain(tokenizer_texts([stories]), tokenizer_texts([chats], chat=True)),
                                  wyrd.get_config(preset).vocab_size)
        model, tok, result = pretrain([stories], out, preset, cfg=pre, resume=resume, tok=tok)
        if result["interrupted"]:
            return result
        meta = result["meta"]
        samples = sample_stories(model, tok, n=STORY_SAMPLES)
        meta["story_samples"], meta["names_per_story"] = samples[:3], names_per_story(samples)
        for story in meta["story_samples"]:
            print(f"--- sample story ---\n{story}")
        model, tok, result = finetune([chats], None, out, ft, model=model, tok=tok, meta=meta, fresh_log=False)
    else:
        ft = resume_config(out, {})[0]
        model, tok, result = finetune([chats], None, out, ft, resume=True)
    if result["interrupted"]:
        return result
    meta = result["meta"]
    rate, replies = reply_check(model, tok, n=check) if check else (float("nan"), [])
    facts, wrong = fact_check(model, tok) if check else (0, [])
    wall = time.time() - t0
    print(f"\n=== Wyrd: {out} written in {_hms(wall)} (this session) ===")
    for ph in ("pretrain", "finetune"):
        s = meta.get(ph, {})
        print(f"{ph:9s} final train loss {s.get('train_loss', float('nan')):.4f} | "
              f"held-out loss {s.get('val_loss', float('nan')):.4f}")
    print(f"replies ending with <|im_end|> within 200 tokens: {rate:.0%} of {check} held-out prompts")
    print(f"world facts answered exactly (greedy): {facts} of {len(_FACTS)}"
          + "".join(f"\n  {q} -> {a!r}" for q, a in wrong[:5]))
    print(f"distinct character names per sampled story: {meta.get('names_per_story', float('nan')):.2f} "
          f"({STORY_SAMPLES} stories; the built-in stories have 1.6)")
    for story in meta.get("story_samples", []):
        print(f"\n--- story ---\n{story}")
    for prompt, reply in replies[:3]:
        print("\n--- chat ---\n" + "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + f"\nassistant: {reply}")
    return dict(result, reply_rate=rate, replies=replies, facts=facts, wall=wall)


DOWNLOADS = {
    "tinystories": ["https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
                    "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt"],
    "oasst": ["https://huggingface.co/datasets/OpenAssistant/oasst1/resolve/main/2023-04-12_oasst_ready.trees.jsonl.gz"],
}


def download(name, folder):
    os.makedirs(folder, exist_ok=True)
    for url in DOWNLOADS[name]:
        dest = os.path.join(folder, url.rsplit("/", 1)[1])
        if os.path.exists(dest):
            print(f"{dest} already exists")
            continue
        tmp, done = dest + ".part", 0
        try:
            with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0)
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    print(f"\r{dest}: {done / 1e6:,.0f} / {total / 1e6:,.0f} MB", end="", flush=True)
            os.replace(tmp, dest)
            print()
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"cannot download {url}: {getattr(e, 'reason', e)}. Without a network, fetch the "
                            f"file on another machine and pass it with --data") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


# ----------------------------------------------------------------------------
# Command line

FLAG_HELP = {
    "steps": "optimizer steps", "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step (gradient accumulation)", "seq_len": "tokens per sequence",
    "lr": "peak learning rate", "min_lr": "final learning rate of the cosine decay",
    "warmup": "linear warmup steps", "weight_decay": "AdamW decoupled weight decay (matrices only)",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "eval_every": "steps between held-out evaluations (0: only at the end)",
    "eval_batches": "batches per held-out evaluation", "ckpt_every": "steps between checkpoints",
    "log_every": "steps between progress lines", "seed": "seed of the model init and the data order",
}


def _training_flags(p, defaults):
    for f in fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=None, help=f"{FLAG_HELP[f.name]} (default: {getattr(defaults, f.name)})")


def _run_flags(p):
    p.add_argument("--resume", action="store_true", help="continue the run stopped at --out (default: off)")
    p.add_argument("--overwrite", action="store_true", help="start over, replacing the run at --out (default: off)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train Wyrd. With no command: the whole default run on the built-in corpus "
                    "(tokenizer, pretrain, fine-tune) -> out/wyrd.safetensors.",
        epilog="Run `python train.py COMMAND --help` for the flags of a command.\n\n"
               + __doc__[__doc__.index("Data formats"):])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("all", help="the default run (also: no command)",
                       description="Tokenizer, pretraining and fine-tuning on the built-in corpus, then a report "
                                   "(held-out losses, samples, reply check).")
    p.add_argument("--out", default="out/wyrd.safetensors", help="checkpoint file (default: out/wyrd.safetensors)")
    p.add_argument("--preset", default="tiny", choices=list(wyrd.PRESETS), help="model size (default: tiny)")
    _run_flags(p)
    p.set_defaults(func=_cmd_all)

    p = sub.add_parser("pretrain", help="pretrain on stories",
                       description="Pretrain on stories (documents joined by <|endoftext|>).")
    p.add_argument("--data", nargs="+", default=["builtin"],
                   help="story files (.txt, .json, .tar.gz, each optionally .gz) or builtin[:N] (default: builtin)")
    p.add_argument("--preset", default="tiny", choices=list(wyrd.PRESETS), help="model size (default: tiny)")
    p.add_argument("--tokenizer", help="tokenizer.json or a checkpoint to take it from "
                                       "(default: train one on the data, with the preset's vocabulary size)")
    p.add_argument("--out", default="out/pretrain.safetensors", help="checkpoint file; the metrics log is "
                   "beside it with the same stem and .jsonl (default: out/pretrain.safetensors)")
    _run_flags(p)
    _training_flags(p, PRETRAIN)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune on conversations",
                       description="Fine-tune on ChatML conversations; only assistant tokens are trained.")
    p.add_argument("--data", nargs="+", default=["builtin"],
                   help="chat files (chat JSONL, OASST messages or trees JSONL, each optionally .gz) "
                        "or builtin[:N] (default: builtin)")
    p.add_argument("--init", help="pretrained checkpoint to start from (required unless --resume)")
    p.add_argument("--lang", default="en", help="OASST language to keep, 'all' for every one (default: en)")
    p.add_argument("--out", default="out/wyrd.safetensors", help="checkpoint file; the metrics log is "
                   "beside it with the same stem and .jsonl (default: out/wyrd.safetensors)")
    _run_flags(p)
    _training_flags(p, FINETUNE)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("convert", help="write any chat file as {\"messages\": [...]} JSONL",
                       description="Convert a chat file (OASST messages or trees, chat JSONL, or builtin[:N]) "
                                   "to {\"messages\": [...]} JSONL (.gz to compress).")
    p.add_argument("input", help="chat file or builtin[:N]")
    p.add_argument("output", help="output .jsonl or .jsonl.gz")
    p.add_argument("--lang", default="en", help="OASST language to keep, 'all' for every one (default: en)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("download", help="fetch TinyStories or OASST (needs a network)")
    p.add_argument("dataset", choices=sorted(DOWNLOADS))
    p.add_argument("--dir", default="data", help="destination folder (default: data)")
    p.set_defaults(func=lambda a: download(a.dataset, a.dir))
    return parser


def _fresh(args):
    """A new run must not destroy one the user made: without --resume, refuse to
    replace an existing run at --out unless --overwrite says so."""
    if args.resume or args.overwrite:
        return
    found = [p for p in (args.out, state_path_of(args.out), log_path_of(args.out)) if os.path.exists(p)]
    if found:
        raise DataError(f"{found[0]} exists: continue that run with --resume, start over with --overwrite, "
                        "or choose another --out")


def _given(args):
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig)}


# the smallest value each flag takes (0 means "off" where it is allowed; see --help)
FLAG_MIN = {"steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 1, "warmup": 0, "eval_every": 0,
            "eval_batches": 1, "ckpt_every": 1, "log_every": 1, "seed": 0,
            "lr": 0, "min_lr": 0, "weight_decay": 0, "grad_clip": 0}


def check_config(cfg):
    """Every training flag in range, before anything is built or written."""
    for name, low in FLAG_MIN.items():
        value = getattr(cfg, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{flag} must be a finite number, got {value}")
        if value < low or (name == "lr" and value == 0):
            raise DataError(f"{flag} must be {'> 0' if name == 'lr' else f'>= {low}'}, got {value}")
    return cfg


def _config(args, defaults, phase):
    given = _given(args)
    if args.resume:
        cfg, saved_phase = resume_config(args.out, given)
        if saved_phase != phase:
            raise wyrd.CheckpointError(f"{args.out}: the saved run is a {saved_phase} run, not {phase}")
        return check_config(cfg)
    return check_config(replace(defaults, **{k: v for k, v in given.items() if v is not None}))


def _cmd_all(args):
    _fresh(args)
    run_default(args.out, args.resume, args.preset)


def _cmd_pretrain(args):
    cfg = _config(args, PRETRAIN, "pretrain")
    _fresh(args)
    pretrain(args.data, args.out, args.preset, args.tokenizer, cfg, args.resume)


def _cmd_finetune(args):
    cfg = _config(args, FINETUNE, "finetune")
    _fresh(args)
    finetune(args.data, args.init, args.out, cfg, args.resume, None if args.lang == "all" else args.lang)


def _cmd_convert(args):
    n = _builtin_count(args.input, DEFAULT_CHATS)
    chats = builtin_chats(n, seed=1) if n else iter_chats(args.input, None if args.lang == "all" else args.lang)
    print(f"{args.output}: {write_chats(args.output, chats):,} conversations")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("all", "pretrain", "finetune", "convert", "download", "-h", "--help"):
        argv = ["all"] + argv
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DataError, TokenizerError, wyrd.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, a missing or read-only folder: the last checkpoint is kept
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (which saves first), or a second Ctrl-C
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
