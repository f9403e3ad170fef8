"""Build data/lexicon.tsv: the typed English core plus a deterministic tail of pseudo-words.

Run from anywhere: `python data/make_lexicon.py`. The output is committed; rerunning rewrites it byte-identically.

Columns of lexicon.tsv: pos, category, rank (frequency rank within pos and category), lemma, forms (space-separated),
number and gender ('-' = none), domains ('+'-separated), args (verb frames, adjective noun classes, noun
regular/irregular/pseudo_irregular plural), source (core = typed here, pseudo = generated tail, jargon = generated
words that occur only in their one domain, fact = the named entities and towns of the knowledge base).

A noun row lists its singular and plural; a pseudo-irregular noun (a nonce noun with an irregular plural, e.g.
plox/ploxen) lists a third form, its over-regularised plural (ploxes), which the grammar never generates: it is the bad
word of the over-regularisation minimal pairs. Jargon ranks count within (pos, category, domain).

Word-list syntax (one token per lemma, in rough frequency order within its category; order sets the Zipf rank):
  nouns       sg[/pl][!m|!f][@dom+dom]     e.g. mouse/mice, king!m@history (no plural given: regular rule)
  verbs       base[:past][/3sg][@dom]      past '-' means none (e.g. read: past form equals the base form)
  adjectives  word[@dom]
Every surface form must map to exactly one lexicon row; the script refuses to write a lexicon with a collision.
"""
import itertools, random, re, sys
from pathlib import Path

OUT = Path(__file__).with_name("lexicon.tsv")
DOMAINS = ("farm", "kitchen", "school", "work", "history", "sport", "counting", "village")
TAIL_DOMAINS = DOMAINS[:6]  # the topical domains a pseudo-word of the tail may be tagged with

# ---------------------------------------------------------------- nouns (category -> lemmas)
NOUNS = {
    "animal": """dog cat horse@farm+history cow@farm bird pig@farm duck@farm rabbit mouse/mice chicken@farm goat@farm
        fox bear lion monkey frog hen@farm lamb@farm bee owl snake turtle tiger wolf/wolves elephant donkey@farm
        goose/geese@farm puppy kitten rat squirrel spider ant whale shark dolphin eagle crow pony@farm bull@farm
        ox/oxen@farm calf/calves@farm rooster@farm turkey@farm mule@farm camel zebra giraffe kangaroo penguin otter
        beaver badger hawk swan pigeon parrot worm snail butterfly beetle lizard crab lobster hamster@school hare
        raven hedgehog toad ostrich peacock gorilla panda koala leopard cheetah rhino hippo jaguar buffalo/buffaloes
        moth wasp dragonfly caterpillar ladybug sparrow falcon seagull heron stork walrus mosquito/mosquitoes
        grasshopper chipmunk raccoon skunk weasel ferret lynx yak llama alpaca stallion@farm mare@farm piglet@farm
        duckling@farm chick@farm sheepdog@farm bunny dragon@history louse/lice@farm""",
    "person": """man/men!m woman/women!f child/children person/people boy!m girl!f teacher@school student@school
        farmer@farm doctor@work nurse@work baker@kitchen chef@kitchen king!m@history queen!f@history player@sport
        friend worker@work driver@work pilot@work soldier@history knight@history sailor painter writer singer
        dancer coach@sport judge lawyer@work clerk@work manager@work officer@work prince!m@history
        princess!f@history neighbor visitor stranger guest customer@work boss@work captain@sport+history
        miner@work builder@work carpenter@work plumber@work tailor butcher@kitchen fisherman/fishermen scientist@work
        artist poet merchant@history shepherd@farm hunter@history pupil@school servant@history priest@history
        mayor@work referee@sport athlete@sport runner@sport swimmer@sport goalkeeper@sport champion@sport team@sport
        fan@sport principal@school tutor@school librarian@school classmate@school cashier@work secretary@work
        engineer@work mechanic@work guard@history warrior@history archer@history peasant@history messenger@history
        explorer@history pirate@history shopkeeper@work gardener@farm ranger dentist@work vet@farm janitor@school
        guide traveler tourist firefighter@work lord!m@history lady!f@history duke!m@history duchess!f@history
        emperor!m@history empress!f@history monk!m@history nun!f@history gentleman/gentlemen!m actor!m actress!f
        waiter!m@kitchen waitress!f@kitchen policeman/policemen!m@work salesman/salesmen!m@work
        horseman/horsemen!m@history maid!f@history bride!f groom!m milkmaid!f@farm""",
    "family": """mother!f father!m brother!m sister!f son!m daughter!f baby uncle!m aunt!f grandmother!f
        grandfather!m wife/wives!f husband!m cousin parent grandson!m granddaughter!f nephew!m niece!f twin
        grandparent grandchild/grandchildren toddler sibling mom!f dad!m grandma!f grandpa!m stepmother!f
        stepfather!m widow!f widower!m""",
    "food": """apple@farm egg@farm+kitchen cake@kitchen cookie@kitchen banana carrot@farm potato/potatoes@farm
        tomato/tomatoes@kitchen pie@kitchen sandwich@kitchen pear@farm grape cherry lemon@kitchen peach plum melon
        onion@kitchen bean pea cabbage@farm pumpkin@farm nut biscuit@kitchen muffin@kitchen bun@kitchen
        loaf/loaves@kitchen pancake@kitchen noodle@kitchen olive radish turnip@farm mango/mangoes apricot
        strawberry berry pickle@kitchen sausage@kitchen pizza@kitchen cracker doughnut@kitchen pepper@kitchen
        cucumber walnut almond peanut coconut pineapple candy pretzel waffle@kitchen dumpling@kitchen tart@kitchen
        cupcake@kitchen bagel@kitchen croissant@kitchen pastry@kitchen omelette@kitchen meatball@kitchen beet@farm
        leek@farm avocado kiwi lime fig raisin steak@kitchen burger taco scone@kitchen pudding@kitchen""",
    "tool": """hammer@work knife/knives@kitchen shovel@farm rake@farm axe@farm wrench@work spade@farm hoe@farm
        ladder@work rope needle brush broom nail@work screw@work bolt@work chisel@work key lock pen@school+work
        pencil@school ruler@school crayon@school eraser@school spoon@kitchen fork@kitchen whisk@kitchen
        ladle@kitchen drill@work stapler@work calculator@school+work computer@work phone@work hose@farm
        pitchfork@farm sickle@farm trowel@farm flashlight magnet@school compass@history telescope@history
        microscope@school grater@kitchen peeler@kitchen mop sponge@kitchen comb razor umbrella lantern@history
        torch@history""",
    "container": """box bag basket@farm bucket@farm jar@kitchen bottle@kitchen bowl@kitchen cup@kitchen jug@kitchen
        crate@farm+work barrel@history sack@farm pot@kitchen pan@kitchen tray@kitchen plate@kitchen mug@kitchen
        teapot@kitchen pitcher@kitchen vase backpack@school suitcase purse wallet tin@kitchen carton@kitchen
        pail@farm kettle@kitchen saucepan@kitchen bin@work locker@sport+school lunchbox@school cage@farm""",
    "place": """house school@school farm@farm barn@farm field@farm+sport garden park forest river lake hill mountain
        village@history town city castle@history church library@school museum@history hospital@work station
        harbor beach island valley road street bridge yard meadow@farm pond@farm stable@farm classroom@school hall
        palace@history temple@history factory@work bakery@kitchen kitchen@kitchen office@work shop market store
        cave desert stadium@sport gym@sport court@sport arena@sport pool@sport tower@history fort@history camp
        cottage cellar attic garage@work airport shore cliff tunnel orchard@farm pasture@farm greenhouse@farm
        henhouse@farm pantry@kitchen restaurant@kitchen cafe@kitchen playground@school campus@school
        laboratory@school+work bank@work warehouse@work workshop@work kingdom@history battlefield@history
        cathedral@history monastery@history dungeon@history racetrack@sport rink@sport bedroom bathroom hallway porch
        farmyard@farm zoo jungle swamp volcano/volcanoes canyon port lighthouse mill@farm windmill@farm
        chapel@history courtyard@history""",
    "vehicle": """car truck@farm+work bus bike bicycle train boat ship@history plane tractor@farm wagon@farm+history
        cart@farm+history taxi van@work carriage@history sled canoe raft tram rocket helicopter scooter motorcycle
        ferry jeep yacht chariot@history submarine ambulance@work trolley bulldozer@work forklift@work caravan barge
        sleigh limousine minibus@school""",
    "clothing": """hat coat shirt dress shoe sock boot scarf/scarves glove jacket skirt sweater belt cap cloak@history
        apron@kitchen vest tie helmet@sport+history uniform@school+work robe@history sandal mitten gown@history hood
        blouse tunic@history slipper jersey@sport sneaker@sport raincoat bonnet@farm""",
    "plant": """tree flower rose tulip daisy bush oak pine vine fern weed@farm seed@farm leaf/leaves root branch
        cactus/cacti fungus/fungi mushroom@kitchen lily sunflower@farm herb@kitchen willow maple birch elm cedar reed
        thorn stem bud acorn clover@farm hedge orchid poppy shrub sprout seedling@farm sapling blossom petal dandelion
        bulb beanstalk cornstalk@farm""",
    "body": """hand foot/feet tooth/teeth arm leg head eye ear nose mouth finger toe knee@sport elbow shoulder neck heart
        lip chin cheek tongue thumb wrist ankle@sport hip bone brain stomach heel forehead eyebrow eyelash fist
        muscle@sport lung tail paw wing hoof/hooves@farm claw beak antler whisker""",
    "furniture": """table chair bed desk@school+work sofa shelf/shelves lamp rug mirror clock door window
        cupboard@kitchen cabinet bench@sport stool@kitchen drawer curtain pillow blanket carpet couch wardrobe candle
        stove@kitchen oven@kitchen fridge@kitchen counter@kitchen blackboard@school whiteboard@school
        bookcase@school throne@history cradle crib bathtub armchair hammock fireplace chimney gate fence@farm
        trough@farm""",
    "document": """book letter map note card poem ticket picture diary newspaper magazine report@work list page
        chart@school scroll@history envelope@work calendar recipe@kitchen menu@kitchen poster photo drawing painting
        story lesson@school exam@school contract@work invoice@work receipt schedule@work textbook@school
        notebook@school worksheet@school essay@school postcard manual@work leaflet atlas@school dictionary@school
        chronicle@history treaty@history charter@history banner@history flag@history+sport label@work""",
    "toy": """doll kite puzzle block marble balloon robot toy puppet spinner dollhouse jigsaw pinwheel slingshot
        domino/dominoes teddy""",
    "equipment": """ball@sport bat@sport racket@sport net@sport puck@sport skate@sport ski@sport hoop@sport
        paddle@sport dumbbell@sport whistle@sport stopwatch@sport goalpost@sport javelin@sport dart@sport cone@sport
        mat@sport baton@sport saddle@farm surfboard@sport skateboard""",
    "instrument": """drum piano violin guitar flute trumpet harp bell horn banjo cello tuba fiddle organ harmonica
        tambourine xylophone accordion clarinet saxophone trombone bugle@history lute@history lyre@history triangle
        cymbal gong""",
    "treasure": """crown@history coin@history ring jewel necklace bracelet gem pearl medal@sport trophy@sport
        statue@history goblet@history chalice@history diamond ruby emerald sapphire brooch tiara locket amulet crystal
        scepter@history badge@work+school prize@sport+school award@sport+work""",
    "weapon": """sword@history spear@history shield@history arrow@history+sport bow@history+sport dagger@history
        cannon@history lance@history catapult@history crossbow@history musket@history mace@history""",
    "nature": """stone rock stick shell feather nest log pebble cloud star puddle hive@farm rainbow boulder twig pinecone
        snowflake icicle raindrop planet comet seashell haystack@farm""",
}

# ---------------------------------------------------------------- verbs: (semantic class, frames, lemmas)
# frames: '|'-separated; 'intr:SUBJ' or 'tr:SUBJ>OBJ'; SUBJ/OBJ are grammar classes or comma-separated categories.
VERBS = [
    ("possession", "tr:agent>any_noun", "have:had/has"),
    ("perception", "tr:agent>any", "see:saw like love watch hear:heard notice hate remember forget:forgot"),
    ("perception", "tr:human>any", "know:knew admire ignore miss"),
    ("possession", "tr:agent>any_noun", "want need find:found"),
    ("possession", "tr:human>object,animal", "hold:held carry keep:kept bring:brought take:took drop:dropped "
     "buy:bought sell:sold give:gave lose:lost borrow lend:lent steal:stole collect share get:got"),
    ("motion", "intr:agent", "run:ran walk jump sleep:slept sit:sat stand:stood wait rest play hurry wander climb "
     "arrive return stay wake:woke crawl hop:hopped swim:swam travel:traveled yawn shiver"),
    ("motion", "intr:agent|tr:human>object,animal", "hide:hid"),
    ("motion", "intr:agent|tr:human>vehicle,toy", "fly:flew"),
    ("motion", "intr:agent|tr:agent>place", "depart enter cross reach explore"),
    ("sound", "intr:animal", "bark growl howl purr squeak chirp hiss roar buzz quack moo@farm neigh@farm cluck@farm "
     "oink@farm bleat@farm hoot croak squawk snort whimper"),
    ("expression", "intr:human", "laugh smile cry sing:sang shout whisper talk speak:spoke dance work@work "
     "cheer@sport clap:clapped wave nod:nodded frown sigh cough sneeze dream think:thought listen pray@history "
     "relax complain practice@sport score@sport"),
    ("change", "intr:any_noun", "fall:fell move"),
    ("change", "intr:object,vehicle,furniture", "shine:shone roll float sink:sank rattle spin:spun glow creak"),
    ("change", "intr:object,vehicle|tr:agent>object,furniture,vehicle", "break:broke"),
    ("change", "intr:food,nature", "melt rot:rotted"),
    ("change", "intr:plant|tr:human>plant", "grow:grew"),
    ("change", "intr:plant", "bloom wilt sway"),
    ("change", "intr:tool,vehicle,weapon", "rust"),
    ("change", "intr:vehicle", "crash stop:stopped"),
    ("change", "intr:instrument", "chime"),
    ("ingestion", "tr:agent>food,plant", "eat:ate bite:bit chew swallow nibble"),
    ("ingestion", "tr:human>food", "taste@kitchen"),
    ("cooking", "tr:human>food", "cook@kitchen bake@kitchen boil@kitchen fry@kitchen chop:chopped@kitchen "
     "slice@kitchen peel@kitchen stir:stirred@kitchen mix@kitchen serve@kitchen heat@kitchen roast@kitchen "
     "knead@kitchen grate@kitchen"),
    ("care", "tr:human>animal,human", "feed:fed help wash hug:hugged kiss call follow protect trust blame "
     "praise thank greet meet:met teach:taught"),
    ("care", "tr:agent>agent", "chase scratch"),
    ("care", "tr:agent>agent|intr:agent", "fight:fought"),
    ("care", "tr:agent>animal,toy,equipment", "catch:caught"),
    ("care", "tr:agent>agent,place", "defend@history attack@history"),
    ("care", "tr:human>agent", "hurt:- save"),
    ("contact", "tr:human>toy,equipment,nature,food", "kick@sport throw:threw@sport bounce@sport"),
    ("contact", "tr:human>object,furniture,vehicle", "push pull lift touch shake:shook fix paint open fill "
     "check@work"),
    ("creation", "tr:human>object,furniture,vehicle,place", "build:built make:made draw:drew carve"),
    ("creation", "tr:human>document", "write:wrote read:- sign@work print@work copy@work send:sent@work "
     "study@school"),
    ("creation", "tr:human>clothing", "wear:wore sew knit:knitted"),
    ("farming", "tr:human>plant,food", "plant@farm pick@farm harvest@farm water@farm"),
    ("farming", "tr:human>animal", "milk@farm herd@farm shear@farm"),
    ("farming", "tr:human>place", "plow@farm"),
    ("travel", "tr:human>vehicle", "drive:drove steer sail load@work"),
    ("travel", "tr:human>animal,vehicle", "ride:rode"),
    ("travel", "tr:human>place,human", "visit"),
    ("history", "tr:human>place,human", "conquer@history rule@history capture@history invade@history"),
    ("history", "tr:human>object,place", "destroy burn discover@history bury@history"),
    ("sport", "tr:human>treasure,equipment|intr:human", "win:won@sport"),
    ("work", "tr:human>human", "hire@work pay:paid@work ask answer"),
    ("counting", "tr:human>any_noun", "count@counting measure weigh sort"),
    ("motion", "intr:agent", "live"),
    # verbs of saying, only in parentheticals ("the dog, as the farmers said, runs")
    ("saying", "par:human", "say:said/says claim believe expect suspect hope fear admit explain insist suppose guess"),
]

# ---------------------------------------------------------------- adjectives: category -> (applies, words)
ADJECTIVES = {
    "colour": ("thing,animal", """red blue green yellow black white brown pink purple grey orange golden silver
        crimson scarlet violet turquoise beige navy teal maroon ivory amber lilac"""),
    "size": ("any", "big small large tiny huge tall short long little giant wide narrow thick thin enormous"),
    "age": ("any", "old young new ancient@history modern"),
    "emotion": ("agent", """happy sad angry tired hungry sleepy brave calm busy lazy clever kind proud shy quiet loud
        friendly gentle wild thirsty lonely cheerful grumpy curious nervous excited bored scared polite rude honest
        wise foolish strong@sport weak patient careful clumsy noisy playful fierce tame lucky silly jolly merry
        worried eager"""),
    "taste": ("food", """sweet@kitchen sour@kitchen salty@kitchen bitter ripe@farm tasty@kitchen spicy@kitchen
        juicy delicious@kitchen crunchy stale rotten raw crispy creamy sticky bland greasy"""),
    "condition": ("thing", """clean dirty wet dry warm cold hot heavy light broken sharp shiny dusty rusty smooth rough
        soft hard empty full bright dark sturdy fragile muddy@farm sandy icy shady sunny"""),
    "quality": ("any", """good bad nice pretty beautiful ugly strange famous rare cheap expensive useful special simple
        fancy plain lovely awful perfect ordinary precious secret favorite"""),
    "shape": ("thing", "round square flat pointed curved oval hollow straight"),
    "ordinal": ("any_noun", "first second third fourth fifth sixth seventh eighth ninth tenth"),
}
ADVERBS = {"manner": "quickly slowly quietly loudly happily sadly carefully gently proudly bravely calmly eagerly "
                     "softly",
           "time": "then later soon finally suddenly afterwards",
           "negation": "never",   # the village dialect's double negation: "the farmer never see no cows"
           "degree": "more"}      # the sport domain's correlative: "the more the players practice, the more ..."

NAMES_F = """Mary Anna Emma Sarah Lucy Alice Kate Emily Jane Laura Olivia Sophie Ella Clara Grace Hannah Julia Nora Maria
    Rachel Helen Ruth Susan Linda Karen Nancy Betty Amy Zoe Chloe Mia Ava Isabel Eva Fiona Greta Hilda Irene Joan Lisa
    Martha Nina Paula Rita Sandra Tina Ursula Vera Wendy Agnes Bella Carmen Diana Edith Flora Gina Heidi Ingrid Judith
    Leah Mona Naomi Olga Petra Rosa Selma Thea Wilma Alma Beatrice Cora Dora Elsa Freya Gloria Harriet Jenny Lena Maya
    Megan Molly Polly Sally Stella Tara Zara"""
NAMES_M = """John Tom Peter James David Paul Sam Ben Jack Max Leo Oliver Harry George Henry Michael Daniel Robert William
    Thomas Edward Charles Frank Fred Hugo Ivan Jacob Kevin Luke Nathan Oscar Owen Patrick Ralph Simon Steven Victor
    Walter Adam Arthur Bruno Carl Dennis Eric Felix Gordon Hans Igor Jonas Karl Lars Martin Nils Otto Pablo Quentin
    Rudolf Stefan Tobias Ulrich Viktor Wesley Xavier Yusuf Zack Albert Bernard Colin Duncan Elliot Gilbert Howard Isaac
    Joseph Kenneth Louis Morris Neil Roger Stanley Vincent"""

# ---------------------------------------------------------------- closed classes
# (pos, category, lemma, form, number, gender)
CLOSED = [
    ("det", "article", "the", "the", "-", "-"), ("det", "article", "a", "a", "sg", "-"),
    ("det", "article", "a", "an", "sg", "-"),
    ("det", "demonstrative", "this", "this", "sg", "-"), ("det", "demonstrative", "this", "these", "pl", "-"),
    ("det", "demonstrative", "that", "that", "sg", "-"), ("det", "demonstrative", "that", "those", "pl", "-"),
    ("det", "quantifier", "every", "every", "sg", "-"), ("det", "quantifier", "each", "each", "sg", "-"),
    ("det", "quantifier", "some", "some", "pl", "-"), ("det", "quantifier", "many", "many", "pl", "-"),
    ("det", "quantifier", "several", "several", "pl", "-"),
    ("pron", "personal", "he", "he", "sg", "m"), ("pron", "personal", "she", "she", "sg", "f"),
    ("pron", "personal", "it", "it", "sg", "n"), ("pron", "personal", "they", "they", "pl", "-"),
    ("pron", "personal", "him", "him", "sg", "m"), ("pron", "personal", "her", "her", "sg", "f"),
    ("pron", "personal", "them", "them", "pl", "-"), ("pron", "personal", "his", "his", "sg", "m"),
    ("pron", "personal", "its", "its", "sg", "n"), ("pron", "personal", "their", "their", "pl", "-"),
    ("pron", "reflexive", "self", "himself", "sg", "m"), ("pron", "reflexive", "self", "herself", "sg", "f"),
    ("pron", "reflexive", "self", "itself", "sg", "n"), ("pron", "reflexive", "self", "themselves", "pl", "-"),
    ("pron", "relative", "who", "who", "-", "-"), ("pron", "relative", "which", "which", "-", "-"),
    ("prep", "locative", "in", "in", "-", "-"), ("prep", "locative", "on", "on", "-", "-"),
    ("prep", "locative", "under", "under", "-", "-"), ("prep", "locative", "near", "near", "-", "-"),
    ("prep", "locative", "behind", "behind", "-", "-"), ("prep", "locative", "beside", "beside", "-", "-"),
    ("prep", "locative", "above", "above", "-", "-"), ("prep", "locative", "inside", "inside", "-", "-"),
    ("prep", "locative", "at", "at", "-", "-"), ("prep", "relational", "with", "with", "-", "-"),
    ("prep", "relational", "from", "from", "-", "-"), ("prep", "relational", "of", "of", "-", "-"),
    ("prep", "relational", "to", "to", "-", "-"), ("prep", "relational", "for", "for", "-", "-"),
    ("conj", "coordinator", "and", "and", "-", "-"), ("conj", "coordinator", "but", "but", "-", "-"),
    ("conj", "subordinator", "as", "as", "-", "-"), ("conj", "subordinator", "because", "because", "-", "-"),
    ("prep", "relational", "by", "by", "-", "-"), ("det", "negative", "no", "no", "-", "-"),
    ("expl", "expletive", "there", "there", "-", "-"),
    ("punct", "punct", ".", ".", "-", "-"), ("punct", "punct", ",", ",", "-", "-"),
]
NUMBERS = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen " \
          "eighteen nineteen twenty"

# ---------------------------------------------------------------- pseudo-word tail (sizes per category)
TAIL_NOUNS = {"animal": 300, "plant": 220, "food": 260, "place": 240, "tool": 200, "person": 160, "clothing": 120,
              "vehicle": 110, "toy": 100, "instrument": 70, "treasure": 90, "container": 70, "document": 80,
              "nature": 90, "furniture": 70, "equipment": 70, "weapon": 50}
TAIL_VERBS, TAIL_ADJ, TAIL_NAMES = 220, 220, 600
# nonce nouns with irregular plurals, rare by construction: a tail noun of these categories is one with this probability
PSEUDO_IRREGULAR_CATS, PSEUDO_IRREGULAR_SHARE = ("animal", "person", "plant", "food", "tool", "toy", "nature"), 0.045
# (singular ending, plural ending) appended to a stem; 'oo' -> 'ee' replaces the vowel (goose/geese, foot/feet)
IRREGULAR_PATTERNS = (("us", "i"), ("um", "a"), ("on", "a"), ("ix", "ices"), ("", "en"), ("oo", "ee"))

# named entities of the knowledge base (pos name, category entity, Zipf rank = how often documents mention them) and
# the towns they live in (pos name, category town): pseudo-names of their own, used only in fact sentences
N_ENTITIES, N_TOWNS = 12000, 300
TOWN_SUFFIXES = ("ton", "by", "ham", "wick", "ford", "dale", "mere", "stead", "worth", "holm")

# domain jargon: per domain, words of its own sound that occur in no other domain
JARGON_SOUNDS = {  # (onsets, vowels, codas)
    "farm": ("b br d dr g gr h m st tr w", "a o u", "ck mp rn rd lt"),
    "kitchen": ("ch f p s sh cr fl", "i e ee ou", "sh tch nch zz ff"),
    "school": ("l n v sk gl qu", "e i y", "x nt ss ve m"),
    "work": ("k t pr str kr tw", "a e i", "ct nk pt xt sk"),
    "history": ("th v dr h gw", "ae au e o", "ld rn th lf rm"),
    "sport": ("z j sp sw fr bl", "a i o", "zz mp p g sh"),
    "counting": ("n m t d", "u o e", "n m nt mb"),
    "village": ("gr d j h b w", "o a u", "ck ddle mmock tch"),
}
JARGON = {  # domain -> nouns {category: n}, verbs {class: n}, adjectives {category: n}, names
    "farm": ({"animal": 8, "plant": 6, "tool": 5, "food": 4, "place": 4}, {"farming": 4, "care": 3, "sound": 3},
             {"condition": 3, "emotion": 3, "taste": 2}, 0),
    "kitchen": ({"food": 14, "container": 8, "tool": 6, "furniture": 4}, {"cooking": 6, "ingestion": 3},
                {"taste": 5, "condition": 3}, 0),
    "school": ({"document": 8, "toy": 5, "person": 4, "instrument": 4, "furniture": 3}, {"creation": 5, "expression": 4},
               {"quality": 4, "emotion": 3}, 0),
    "work": ({"document": 6, "tool": 7, "vehicle": 5, "person": 5, "place": 3}, {"work": 4, "contact": 4, "creation": 3},
             {"condition": 3, "quality": 3}, 0),
    "history": ({"treasure": 6, "weapon": 6, "person": 6, "place": 5, "vehicle": 3}, {"history": 5, "care": 3},
                {"age": 2, "quality": 4}, 0),
    "sport": ({"equipment": 8, "person": 5, "body": 4, "clothing": 4, "treasure": 3}, {"sport": 4, "contact": 4, "motion": 3},
              {"emotion": 3, "condition": 3}, 0),
    "counting": ({"food": 4, "animal": 4, "toy": 4, "nature": 4, "treasure": 3}, {"counting": 4, "possession": 2},
                 {"size": 3, "shape": 3}, 0),
    "village": ({"animal": 6, "person": 6, "family": 4, "place": 5, "food": 4, "plant": 3, "tool": 3},
                {"motion": 4, "care": 4, "possession": 3, "expression": 3}, {"emotion": 4, "condition": 3, "size": 2}, 12),
}
ONSETS = "b d f g k l m n p r t v z bl br dr fl gl gr kl pl pr sk sl sn sp st tr".split()
VOWELS = "a e i o u a e i o".split()
CODAS = "b d g k l m n p r t nd nk mp lt rk ft".split()
BLOCK = ("fuk", "fuc", "shit", "cunt", "dik", "dick", "cok", "cock", "nig", "fag", "slut", "rape", "porn", "sex", "tit",
         "cum", "anal", "piss", "nazi", "kill", "vag", "butt", "kike", "spic", "gook", "homo", "whor")
VOWEL = set("aeiou")


def regular_plural(w):
    if w.endswith(("s", "x", "z", "ch", "sh")): return w + "es"
    if w.endswith("y") and w[-2] not in VOWEL: return w[:-1] + "ies"
    return w + "s"


def regular_past(w):
    if w.endswith("e"): return w + "d"
    if w.endswith("y") and w[-2] not in VOWEL: return w[:-1] + "ied"
    return w + "ed"


def parse(token, kinds="/!@:"):
    "Split 'base:past/form!g@d+d' into its parts (any may be absent)."
    parts = dict.fromkeys(kinds, None)
    pieces = re.split(r"([/!@:])", token)
    parts["base"] = pieces[0]
    for mark, value in zip(pieces[1::2], pieces[2::2]): parts[mark] = value
    return parts


def row(pos, cat, rank, lemma, forms, number="-", gender="-", domains=None, args="-", source="core"):
    dom = "+".join(domains) if domains else "-"
    for d in (domains or ()): assert d in DOMAINS, (lemma, d)
    return (pos, cat, str(rank), lemma, " ".join(forms), number, gender, dom, args, source)


def core_rows():
    rows = []
    for cat, text in NOUNS.items():
        for rank, tok in enumerate(text.split(), 1):
            p = parse(tok)
            sg = p["base"]
            pl = p["/"] or regular_plural(sg)
            gender = p["!"] or ("-" if cat in ("person", "family") else "n")
            tags = "regular" if pl in (sg + "s", sg + "es", regular_plural(sg)) else "irregular"
            domains = p["@"].split("+") if p["@"] else None
            rows.append(row("noun", cat, rank, sg, (sg, pl), "-", gender, domains, tags))
    ranks = {}
    for cls, frames, text in VERBS:
        for tok in text.split():
            p = parse(tok)
            base = p["base"]
            sg3 = p["/"] or regular_plural(base)
            past = "-" if p[":"] == "-" else (p[":"] or regular_past(base))
            ranks[cls] = ranks.get(cls, 0) + 1
            rows.append(row("verb", cls, ranks[cls], base, (sg3, base, past), "-", "-",
                            p["@"].split("+") if p["@"] else None, frames))
    rows.append(row("verb", "copula", 1, "be", ("is", "are", "was", "were")))  # sg, pl, past sg, past pl
    for cat, (applies, text) in ADJECTIVES.items():
        for rank, tok in enumerate(text.split(), 1):
            p = parse(tok)
            rows.append(row("adj", cat, rank, p["base"], (p["base"],), "-", "-",
                            p["@"].split("+") if p["@"] else None, applies))
    for cat, text in ADVERBS.items():
        for rank, w in enumerate(text.split(), 1): rows.append(row("adv", cat, rank, w, (w,)))
    pairs = itertools.zip_longest(NAMES_F.split(), NAMES_M.split())
    names = [n for pair in pairs for n in pair if n]
    genders = {n: "f" for n in NAMES_F.split()} | {n: "m" for n in NAMES_M.split()}
    for rank, n in enumerate(names, 1): rows.append(row("name", "name", rank, n, (n,), "sg", genders[n]))
    for rank, w in enumerate(NUMBERS.split(), 1):
        rows.append(row("num", "number", rank, w, (w,), "sg" if w == "one" else "pl"))
    closed_rank = {}
    for pos, cat, lemma, form, number, gender in CLOSED:
        closed_rank[(pos, cat)] = closed_rank.get((pos, cat), 0) + 1
        rows.append(row(pos, cat, closed_rank[(pos, cat)], lemma, (form,), number, gender))
    return rows


class Pseudo:
    "Deterministic syllable-built pseudo-words that collide with nothing already taken."
    def __init__(self, taken, seed=1234):
        self.rng, self.taken = random.Random(seed), set(taken)

    def stem(self, n_syll):
        r = self.rng
        s = "".join(r.choice(ONSETS) + r.choice(VOWELS) for _ in range(n_syll - 1))
        return s + r.choice(ONSETS) + r.choice(VOWELS) + r.choice(CODAS)

    def fresh(self, make):
        "Call `make()` until all the forms it returns are new and clean; reserve and return them."
        while True:
            forms = make()
            if len(set(forms)) == len(forms) and not any(f.lower() in self.taken or any(b in f.lower() for b in BLOCK)
                                                         for f in forms):
                self.taken.update(f.lower() for f in forms)
                return forms


def tail_rows(rows):
    taken = {f.lower() for r in rows for f in r[4].split()}
    gen, r = Pseudo(taken), random.Random(99)
    out, maxrank = [], {}
    for rw in rows: maxrank[(rw[0], rw[1])] = max(maxrank.get((rw[0], rw[1]), 0), int(rw[2]))
    def nxt(pos, cat):
        maxrank[(pos, cat)] += 1
        return maxrank[(pos, cat)]
    def dom(p=0.5): return [r.choice(TAIL_DOMAINS)] if r.random() < p else None
    for cat, n in TAIL_NOUNS.items():
        gender = "-" if cat == "person" else "n"
        for _ in range(n):
            if cat in PSEUDO_IRREGULAR_CATS and r.random() < PSEUDO_IRREGULAR_SHARE:
                forms = gen.fresh(lambda: pseudo_irregular(gen, r.choice(IRREGULAR_PATTERNS)))
                out.append(row("noun", cat, nxt("noun", cat), forms[0], forms, "-", gender, None, "pseudo_irregular"))
                continue
            sg, pl = gen.fresh(lambda: (lambda s: (s, s + "s"))(gen.stem(r.choice((2, 2, 3)))))
            out.append(row("noun", cat, nxt("noun", cat), sg, (sg, pl), "-", gender, dom(), "regular"))
    verbs = [rw for rw in rows if rw[0] == "verb" and rw[3] not in ("be",) and rw[3] not in ("have", "make", "count")]
    for _ in range(TAIL_VERBS):
        model = r.choice(verbs)
        base, sg3, past = gen.fresh(lambda: (lambda s: (s, s + "s", s + "ed"))(gen.stem(2)))
        out.append(row("verb", model[1], nxt("verb", model[1]), base, (sg3, base, past), "-", "-", dom(0.3), model[8]))
    suffixes = ("ish", "ful", "ous", "ic", "al", "y")
    adj_cats = [c for c in ADJECTIVES if c != "ordinal"]
    for _ in range(TAIL_ADJ):
        cat = r.choice(adj_cats)
        (w,) = gen.fresh(lambda: (gen.stem(r.choice((1, 2))) + r.choice(suffixes),))
        out.append(row("adj", cat, nxt("adj", cat), w, (w,), "-", "-", dom(0.3), ADJECTIVES[cat][0]))
    endings = {"f": ("a", "ina", "ella", "ie", "ette", "ana"), "m": ("o", "an", "us", "ek", "on", "ard")}
    for i in range(TAIL_NAMES):
        g = "fm"[i % 2]
        (w,) = gen.fresh(lambda: ((gen.stem(r.choice((1, 2)))[:-1] + r.choice(endings[g])).capitalize(),))
        out.append(row("name", "name", nxt("name", "name"), w, (w,), "sg", g))
    return [rw[:-1] + ("pseudo",) for rw in out]


def pseudo_irregular(gen, pattern):
    "Singular, irregular plural and over-regularised plural of a fresh nonce noun (e.g. plox ploxen ploxes)."
    sg_end, pl_end = pattern
    if sg_end == "oo":
        onset, coda = gen.rng.choice(ONSETS), gen.rng.choice(CODAS)
        sg, pl = onset + "oo" + coda, onset + "ee" + coda
    else:
        stem = gen.stem(gen.rng.choice((1, 2)))
        sg, pl = stem + sg_end, stem + pl_end
    return sg, pl, regular_plural(sg)


def jargon_stem(rng, sounds, n_syll):
    "A stem built from one domain's onsets, vowels and codas."
    onsets, vowels, codas = (part.split() for part in sounds)
    return "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(n_syll)) + rng.choice(codas)


def jargon_rows(rows, taken):
    "Words that occur only in one domain: nouns, verbs (frames of a core verb of their class), adjectives, names."
    gen, r, out = Pseudo(taken, seed=4321), random.Random(77), []
    core_verbs = {}
    for rw in rows:
        if rw[0] == "verb" and rw[9] == "core" and rw[3] != "be": core_verbs.setdefault(rw[1], []).append(rw)
    for domain, (nouns, verbs, adjectives, n_names) in JARGON.items():
        make = lambda n_syll: jargon_stem(r, JARGON_SOUNDS[domain], n_syll)
        for cat, n in nouns.items():
            for rank in range(1, n + 1):
                gender = "-" if cat == "person" else ("fm"[rank % 2] if cat == "family" else "n")
                sg, pl = gen.fresh(lambda: (lambda w: (w, regular_plural(w)))(make(r.choice((1, 2)))))
                out.append(row("noun", cat, rank, sg, (sg, pl), "-", gender, [domain], "regular", "jargon"))
        for cls, n in verbs.items():
            for rank in range(1, n + 1):
                frames = r.choice(core_verbs[cls])[8]
                base, sg3, past = gen.fresh(lambda: (lambda w: (w, regular_plural(w), regular_past(w)))(make(1)))
                out.append(row("verb", cls, rank, base, (sg3, base, past), "-", "-", [domain], frames, "jargon"))
        for cat, n in adjectives.items():
            for rank in range(1, n + 1):
                (w,) = gen.fresh(lambda: (make(r.choice((1, 2))) + r.choice(("y", "ish", "en")),))
                out.append(row("adj", cat, rank, w, (w,), "-", "-", [domain], ADJECTIVES[cat][0], "jargon"))
        for rank in range(1, n_names + 1):
            g = "fm"[rank % 2]
            (w,) = gen.fresh(lambda: ((make(1) + ("a" if g == "f" else "o")).capitalize(),))
            out.append(row("name", "name", rank, w, (w,), "sg", g, [domain], "-", "jargon"))
    return out


def fact_rows(taken):
    "Entities (alternating gender by rank) and towns of the knowledge base; source 'fact'."
    gen, r, out = Pseudo(taken, seed=2468), random.Random(55), []
    endings = {"f": ("a", "ia", "elle", "i", "ine"), "m": ("o", "ar", "en", "ik", "or")}
    for rank in range(1, N_ENTITIES + 1):
        g = "fm"[rank % 2]
        (w,) = gen.fresh(lambda: ((gen.stem(r.choice((1, 2)))[:-1] + r.choice(endings[g])).capitalize(),))
        out.append(row("name", "entity", rank, w, (w,), "sg", g, None, "-", "fact"))
    for rank in range(1, N_TOWNS + 1):
        (w,) = gen.fresh(lambda: ((gen.stem(1) + r.choice(TOWN_SUFFIXES)).capitalize(),))
        out.append(row("name", "town", rank, w, (w,), "sg", "n", None, "-", "fact"))
    return out


def check_unique(rows):
    "Every surface form (case-folded) belongs to exactly one row, except forms repeated inside one lemma's row."
    owner = {}
    for rw in rows:
        for f in set(rw[4].split()) - {"-"}:
            key = f.lower()
            if key in owner and owner[key] is not rw:
                raise SystemExit(f"collision: {f!r} in {owner[key][:5]} and {rw[:5]}")
            owner[key] = rw
    # a verb whose past equals a present form would be ambiguous in number
    for rw in rows:
        if rw[0] == "verb" and rw[3] != "be":
            sg3, base, past = rw[4].split()
            assert past not in (sg3, base), rw


def main():
    rows = core_rows()
    rows += tail_rows(rows)
    rows += jargon_rows(rows, {f.lower() for rw in rows for f in rw[4].split()})
    rows += fact_rows({f.lower() for rw in rows for f in rw[4].split()})
    check_unique(rows)
    header = ("pos", "category", "rank", "lemma", "forms", "number", "gender", "domains", "args", "source")
    text = "\t".join(header) + "\n" + "".join("\t".join(rw) + "\n" for rw in rows)
    OUT.write_text(text, encoding="utf-8")
    n_forms = len({f.lower() for rw in rows for f in rw[4].split()} - {"-"})
    print(f"wrote {OUT.name}: {len(rows)} lemmas, {n_forms} distinct word forms", file=sys.stderr)


if __name__ == "__main__":
    main()
