"""The built-in corpus: a seeded generator of TinyStories-style stories and ChatML
conversations, so `python train.py` trains offline, with no download.

A story is drawn slot by slot (hero, friend, place, object, problem, phrasing);
the product of the slots is in the billions, so a held-out split measures
generalisation. A conversation greets, tells a story on request and answers
questions about it, states simple world facts (FACTS), or says who Wyrd is.

    builtin_stories(n, seed)   # n distinct stories
    builtin_chats(n, seed)     # n conversations, lists of {"role", "content"}
    fact_check(model, tok)     # what a model learned: facts, names per story, replies
    skill_check(model, tok)    # ... and topic, recall and not knowing, on held-out seeds
"""
import random
import re

import runtime  # noqa: F401  (the thread policy)
import numpy as np

from sampling import Settings, complete, generate
from tokenizer import DEFAULT_SYSTEM

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
# Questions outside the stories' world, drawn from templates so that the model learns
# the kind of question rather than a few sentences; OUTSIDE's held-out ones are never drawn.
_UNKNOWN_ASKS = {
    "country": (["What is the capital of {}?", "Who is the president of {}?", "What language do people speak in {}?",
                 "How many people live in {}?", "What is the weather like in {}?"],
                "France Spain Italy Japan Brazil Egypt Canada Mexico India Kenya Norway Peru Germany Chile".split()),
    "sum": (["What is {} minus {}?", "How much is {} and {}?", "What is {} divided by {}?", "Can you add {} and {}?"],
            None),
    "how": (["How does {} work?", "Can you explain how {} works?"],
            ["a car engine", "a rocket", "a microwave", "a fridge", "electricity", "a phone", "a computer",
             "a solar panel", "a television", "the stock market", "a vaccine", "a radio"]),
    "what": (["What is {}?", "Can you tell me what {} is?"],
             ["gravity", "an atom", "DNA", "a black hole", "a volcano", "the economy", "a galaxy", "inflation",
              "a molecule", "democracy", "an algorithm", "electricity"]),
    "who": (["Who invented {}?", "Who discovered {}?"],
            ["the telephone", "the light bulb", "the car", "the radio", "penicillin", "the printing press",
             "the computer", "electricity", "the steam engine", "America"]),
    "when": (["When was {} built?", "Who built {}?"],
             ["the Eiffel Tower", "the Great Wall of China", "the Colosseum", "the Statue of Liberty", "Big Ben"]),
    "old": (["How old is {}?", "How big is {}?"], ["the universe", "the earth", "the sun", "the ocean"]),
    "task": (["Can you {}?", "Could you {} for me?", "Please {}."],
             ["help me with my taxes", "write a computer program", "do my homework", "send an email",
              "order a pizza", "call my mom", "play some music", "find a good restaurant", "check my bank account",
              "fix my car", "write an essay about history", "set an alarm", "turn on the lights"]),
    "news": (["Who won the {}?", "What happened in the {}?"],
             ["game last night", "World Cup", "election", "big race yesterday", "news today", "match on Sunday"]),
}
_UNKNOWN_REPLIES = [
    "I am sorry, I do not know that. I am a small model, and I only know simple things. Would you like a story instead?",
    "I don't know the answer to that. I know a lot of stories, though! Shall I tell you one?",
    "That is a hard question for me. I am a small assistant that knows stories and simple facts.",
    "I am not sure about that. I only know stories and simple things. Would you like to hear a story?",
    "I can't do that, I am sorry. I am a small assistant, but I can tell you a story!"]


def _unknown_question(rng):
    while True:
        templates, fill = _UNKNOWN_ASKS[rng.choice(sorted(_UNKNOWN_ASKS))]
        template = rng.choice(templates)
        q = (template.format(rng.randint(2, 20), rng.randint(1, 9)) if fill is None
             else template.format(rng.choice(fill)))
        if q not in OUTSIDE:
            return q


# (question, answer) pairs about the world the stories live in
FACTS = ([(f"What sound does a {a} make?", f"A {a} says \"{s}\".") for a, s in
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


def _story_turn(rng, topic=None):
    """A story request about `topic` (random if None) -> (user, assistant, facts)."""
    # most requests name a topic: following one is the skill to learn, and it needs the practice
    topic = topic or rng.choice(["none", "kind", "kind", "name", "place", "theme", "object"])
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
    # the word a story about it uses (a theme's story holds no one word)
    facts["topic"] = None if topic == "theme" else args.get("kind", args.get("name", args.get("place", args.get("obj"))))
    return rng.choice(_STORY_ASK).format(about=about), rng.choice(_STORY_LEAD).format(about=about) + text, facts


def _question_pool(rng, facts):
    """The (question, answer) pairs one can ask about a story just told."""
    f = facts
    pool = list(f["qa"]) + [
        (rng.choice(["Who is the story about?", "Who is in the story?"]), f"The story is about {f['intro']}."),
        (f"What is the name of the {f['kind']}?", f"The {f['kind']}'s name is {f['name']}."),
        (rng.choice([f"What did {f['name']} learn?", "What is the lesson of the story?"]),
         f"{f['name']} learned {f['lesson']}.")]
    if f["friend_known"]:
        pool.append((f"Who is {f['fname']}?", f"{f['fname']} is {f['friend_intro']}, {f['name']}'s friend."))
    return pool


def _chat(rng):
    system = rng.choice(_SYSTEMS)
    msgs = [dict(role="system", content=system)] if system else []

    def say(pair):
        msgs.extend([dict(role="user", content=rng.choice(pair[0])),
                     dict(role="assistant", content=rng.choice(pair[1]))])

    if rng.random() < 0.3:
        say(_GREETINGS if rng.random() < 0.7 else _HOW_ARE_YOU)
    main = rng.choices(["story", "facts", "identity", "unknown"], weights=[48, 32, 8, 12])[0]
    if main == "story":
        user, reply, facts = _story_turn(rng)
        say(([user], [reply]))
        if rng.random() < 0.85:  # answering from what it just told is a skill of its own
            pool = _question_pool(rng, facts)
            for q, a in rng.sample(pool, min(len(pool), rng.choice([1, 2, 2, 3]))):
                say(([q], [a]))
    elif main == "facts":
        for q, a in rng.sample(FACTS, rng.choice([1, 1, 2, 3])):
            say(([q], [a]))
    elif main == "identity":
        say(_IDENTITY)
    else:
        say(([_unknown_question(rng)], _UNKNOWN_REPLIES))
    if rng.random() < 0.3:
        say(_THANKS)
    if rng.random() < 0.2:
        say(_GOODBYE)
    return msgs


def builtin_chats(n, seed=0):
    """`n` generated ChatML conversations (lists of {"role", "content"}), deterministic in `seed`."""
    rng = random.Random(seed)
    return [_chat(rng) for _ in range(n)]


# every character name a story can use (the default run counts them per sampled story)
NAMES = sorted(set(_GIRLS + _BOYS + _PET_NAMES))


# ---------------------------------------------------------------------------
# What a model learned from this corpus, for the default run's final report: sampled
# stories and their names, the reply check, the world facts. Sampling is chat.py's
# (sampling.py, the spec's defaults: temperature 0.7, top-k 50, top-p 0.9, repetition
# penalty 1.1), so the numbers are what a user of chat.py sees.

STORY_SAMPLES = 20              # stories the default run samples to count character names
HELD_OUT_SEED = 1_000_003       # seed of the reply check's prompts, unused by training data


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


_NAME_RE = re.compile(r"\b(?:" + "|".join(NAMES) + r")\b")


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
    for question, answer in FACTS:
        ids, _ = tok.render_chat([{"role": "system", "content": DEFAULT_SYSTEM},
                                  {"role": "user", "content": question}], add_generation_prompt=True)
        out = list(generate(model, tok, None, ids, Settings(temperature=0, repetition_penalty=1, max_tokens=max_new)))
        reply = tok.decode([t for t in out if t not in (tok.im_end_id, tok.eot_id)])
        if reply == answer and out[-1] == tok.im_end_id:
            right += 1
        else:
            wrong.append((question, reply))
    return right, wrong


# The chat skills, on conversations drawn with seeds no training run uses (training's
# are 0 and 1), greedy as fact_check: a story about what was asked, answers about the
# story it just told, and "I don't know" to what its world does not hold.
TOPIC_SEED, RECALL_SEED = HELD_OUT_SEED + 1, HELD_OUT_SEED + 2
# questions outside the stories' world that no conversation of the corpus asks
OUTSIDE = ["Who was the first president of the United States?", "Can you write me a poem about the sea?",
           "What is 2 plus 3?", "Why is the sky blue?", "How far away is the moon?", "What is the speed of light?",
           "Who wrote Romeo and Juliet?", "How do airplanes fly?", "What year did the Second World War end?",
           "Can you translate this into Spanish?", "What is the biggest country in the world?",
           "How do I bake bread?", "What is photosynthesis?", "Can you book me a flight to Paris?",
           "What is the population of China?", "How many bones are in the human body?",
           "What is the price of gold today?", "Can you fix my computer?", "What is 12 times 7?",
           "Who painted the Mona Lisa?", "How does the internet work?", "What is the tallest mountain in the world?",
           "Can you explain quantum physics?", "What time is it in Tokyo?"]
_DECLINES = re.compile(r"do not know|don't know|not sure|hard question|only know|a story instead|tell you one|"
                       r"like a story|like to hear a story|can tell you a story")
_LEAD_RE = re.compile(r"(?:Sure! |(?:Of course! )?Here is a (?:short )?story[^\n]*\n\n|Okay! Here is a short story\.\n\n)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_OBJECT_RE = re.compile(r"\b(?:" + "|".join(_OBJECTS) + r")s?\b")


def topic_cases(n, seed=TOPIC_SEED):
    """n held-out story requests about an animal or toy, a named girl or boy, a place or
    a lost object -> [(request, the word the story must use, the corpus's own reply)]."""
    rng, cases = random.Random(seed), []
    for _ in range(n):  # the four topics evenly, whatever the training mix
        user, reply, facts = _story_turn(rng, rng.choice(["kind", "name", "place", "object"]))
        cases.append((user, facts["topic"], reply))
    return cases


def is_about(reply, word, sentences=5):
    """Whether the story's first sentences (after a lead such as "Here is a story about
    ...", which only echoes the request) use the word. Five, as a place often enters
    in the third to fifth: the corpus's own stories pass 97% of topic_cases."""
    story = _LEAD_RE.sub("", reply, count=1).lstrip()
    start = " ".join(_SENTENCE_END.split(story)[:sentences])
    return re.search(rf"\b{re.escape(word)}\b", start, re.IGNORECASE) is not None


def recall_cases(n, seed=RECALL_SEED):
    """n held-out conversations: a story request, the corpus's story as the assistant's
    turn, then one of the corpus's questions about it -> [(messages, exact answer)]."""
    rng, cases = random.Random(seed), []
    for _ in range(n):
        user, reply, facts = _story_turn(rng)
        question, answer = rng.choice(_question_pool(rng, facts))
        cases.append(([dict(role="system", content=DEFAULT_SYSTEM), dict(role="user", content=user),
                       dict(role="assistant", content=reply), dict(role="user", content=question)], answer))
    return cases


def declines(reply):
    """Whether a reply says it does not know, or offers a story instead."""
    return _DECLINES.search(reply) is not None


def objects_per_story(stories):
    """Mean number of distinct objects from the corpus's list per story: its own stories
    name ~0.5 (the problem's object, when the problem has one); a model that loses the
    thread turns a kite into a ball, then a car."""
    return float(np.mean([len(set(m.rstrip("s") for m in _OBJECT_RE.findall(s))) for s in stories]))


def _greedy(model, tok, messages, max_new):
    ids, _ = tok.render_chat(messages, add_generation_prompt=True)
    out = list(generate(model, tok, None, ids, Settings(temperature=0, repetition_penalty=1, max_tokens=max_new)))
    return tok.decode([t for t in out if t not in (tok.im_end_id, tok.eot_id)])


def skill_check(model, tok, n=40):
    """Greedy replies to held-out requests -> {"topic", "recall", "declines"}: the share
    of n story requests whose story is about what was asked (is_about), of n questions
    about a story answered exactly, and of the OUTSIDE questions declined."""
    system = dict(role="system", content=DEFAULT_SYSTEM)
    topic = np.mean([is_about(_greedy(model, tok, [system, dict(role="user", content=user)], 80), word)
                     for user, word, _ in topic_cases(n)])
    recall = np.mean([_greedy(model, tok, messages, 40) == answer for messages, answer in recall_cases(n)])
    declined = np.mean([declines(_greedy(model, tok, [system, dict(role="user", content=q)], 60)) for q in OUTSIDE])
    return dict(topic=float(topic), recall=float(recall), declines=float(declined))
