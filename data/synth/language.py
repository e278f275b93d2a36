"""Every sentence the synthetic world can say, in English and Chinese.

Statement templates render facts into documents and passages ({n} = name, {v} = value); question
templates ask for one attribute. Several phrasings per fact are what lets a small model learn the
fact itself rather than one string (knowledge extraction needs varied pretraining text).
"""
from __future__ import annotations

STATEMENTS: dict[str, dict[str, dict[str, list[str]]]] = {
    "person": {
        "town": {"en": ["{n} was born in {v}.", "{n}'s home town is {v}.", "{n} comes from the town of {v}.",
                        "The town of {v} is where {n} was born."],
                 "zh": ["{n}出生在{v}。", "{n}的家乡是{v}。", "{n}来自{v}镇。", "{v}是{n}出生的地方。"]},
        "job": {"en": ["{n} works as a {v}.", "{n} is a {v} by trade.", "{n} earns a living as a {v}.",
                       "By profession, {n} is a {v}."],
                "zh": ["{n}是一名{v}。", "{n}的职业是{v}。", "{n}以当{v}为生。", "{n}平时的工作是{v}。"]},
        "colour": {"en": ["{n}'s favourite colour is {v}.", "{n} likes {v} more than any other colour.",
                          "The colour {n} loves most is {v}.", "Of all colours, {n} prefers {v}."],
                   "zh": ["{n}最喜欢的颜色是{v}。", "{n}最喜欢{v}。", "在所有颜色中，{n}最爱{v}。", "{n}偏爱{v}。"]},
        "pet": {"en": ["{n} keeps a {v} as a pet.", "{n} has a pet {v}.", "At home, {n} looks after a {v}.",
                       "{n}'s pet is a {v}."],
                "zh": ["{n}养了一只{v}。", "{n}的宠物是一只{v}。", "{n}家里有一只{v}。", "{n}在家照顾一只{v}。"]},
    },
    "company": {
        "year": {"en": ["{n} was founded in {v}.", "{n} has existed since {v}.", "{n} opened its doors in {v}.",
                        "In {v}, {n} was established."],
                 "zh": ["{n}成立于{v}年。", "{n}创办于{v}年。", "{n}从{v}年开始营业。", "{v}年，{n}成立了。"]},
        "town": {"en": ["{n} is based in {v}.", "The headquarters of {n} are in {v}.",
                        "{n} has its main office in {v}.", "You can find {n} in the town of {v}."],
                 "zh": ["{n}的总部在{v}。", "{n}位于{v}。", "{n}的主要办公室设在{v}。", "在{v}镇可以找到{n}。"]},
        "product": {"en": ["{n} makes {v}.", "{n} is known for its {v}.", "The main product of {n} is {v}.",
                           "{n} sells {v} all over the land."],
                    "zh": ["{n}生产{v}。", "{n}以{v}闻名。", "{n}的主要产品是{v}。", "{n}把{v}卖到各地。"]},
    },
}

QUESTIONS: dict[str, dict[str, dict[str, list[str]]]] = {
    "person": {
        "town": {"en": ["Where was {n} born?", "What is {n}'s home town?", "Which town does {n} come from?"],
                 "zh": ["{n}出生在哪里？", "{n}的家乡是哪里？", "{n}来自哪个镇？"]},
        "job": {"en": ["What does {n} do for a living?", "What is {n}'s job?", "What is {n}'s occupation?"],
                "zh": ["{n}是做什么工作的？", "{n}的职业是什么？", "{n}靠什么谋生？"]},
        "colour": {"en": ["What is {n}'s favourite colour?", "Which colour does {n} like best?",
                          "What colour does {n} love most?"],
                   "zh": ["{n}最喜欢什么颜色？", "{n}最喜欢的颜色是什么？", "{n}最爱哪种颜色？"]},
        "pet": {"en": ["What pet does {n} have?", "What animal does {n} keep as a pet?",
                       "What kind of pet does {n} keep?"],
                "zh": ["{n}养了什么宠物？", "{n}的宠物是什么动物？", "{n}家里养了什么动物？"]},
    },
    "company": {
        "year": {"en": ["When was {n} founded?", "In which year was {n} founded?", "What year did {n} open?"],
                 "zh": ["{n}是哪一年成立的？", "{n}成立于哪一年？", "{n}是哪一年创办的？"]},
        "town": {"en": ["Where is {n} based?", "In which town is {n} based?", "Where are the headquarters of {n}?"],
                 "zh": ["{n}的总部在哪里？", "{n}位于哪个镇？", "{n}设在哪个镇？"]},
        "product": {"en": ["What does {n} make?", "What is {n} known for making?", "What is the main product of {n}?"],
                    "zh": ["{n}生产什么？", "{n}以什么闻名？", "{n}的主要产品是什么？"]},
    },
}

NOT_IN_PASSAGE = {"en": "The passage does not say.", "zh": "文中没有提到。"}
SENTENCE_JOIN = {"en": " ", "zh": ""}
DOC_INTROS = {"en": ["", "", "This is a short note about {n}.", "Here are some facts about {n}."],
              "zh": ["", "", "这是关于{n}的简短介绍。", "下面是关于{n}的一些事实。"]}
SYSTEM_PROMPTS = {"en": ["You are a helpful assistant.", "You are a helpful assistant. Answer briefly.",
                         "Answer the question with a short answer."],
                  "zh": ["你是一个乐于助人的助手。", "你是一个乐于助人的助手，请简短回答。", "请用简短的答案回答问题。"]}
CONTEXT_PROMPT = {"en": "Passage: {p}\nQuestion: {q}", "zh": "短文：{p}\n问题：{q}"}
CONTEXT_FOLLOW_UP = {"en": "Question: {q}", "zh": "问题：{q}"}
CONTEXT_INSTRUCTION = {"en": "Answer using only the passage.\n", "zh": "只根据短文回答。\n"}
DESCRIBE = {"en": ["Tell me about {n}.", "What do you know about {n}?"], "zh": ["请介绍一下{n}。", "你知道{n}的哪些事？"]}
QA_TEXT = {"en": "Question: {q}\nAnswer: {a}", "zh": "问：{q}\n答：{a}"}
CONTEXT_TEXT = {"en": "Passage: {p}\nQuestion: {q}\nAnswer: {a}", "zh": "短文：{p}\n问题：{q}\n答：{a}"}
GREETINGS = {"en": [("Hello!", "Hello! How can I help you?"), ("Hi there.", "Hi! What would you like to know?")],
             "zh": [("你好！", "你好！有什么可以帮你的吗？"), ("嗨。", "你好！你想知道什么？")]}
RAMBLE = {"en": "Well, that is a very interesting question, and there is a lot one could say about it.",
          "zh": "嗯，这是一个很有意思的问题，关于它可以说很多很多。"}
