import gin
import pytest
import tensorflow as tf

from gemb.data import templates


def _tf_str(tensor):
    return [t.decode() for t in tf.reshape(tensor, [-1]).numpy()]


def test_recipe_formats():
    template = templates.default_template("question_answering")
    assert template.query("who wrote it") == "task: question answering | query: who wrote it"
    assert template.document("It was Ann.", "Books") == "title: Books | text: It was Ann."
    assert template.document("It was Ann.") == "title: none | text: It was Ann."


def test_symmetric_tasks_prompt_both_sides():
    template = templates.default_template("sentence_similarity")
    assert template.symmetric
    assert template.document("A dog runs.") == "task: sentence similarity | query: A dog runs."


@pytest.mark.parametrize("kind", sorted(templates.TASK_DESCRIPTIONS))
def test_tensorflow_rendering_matches_python(kind):
    template = templates.default_template(kind)
    texts = ["a b", "ünïcode ✓", ""]
    titles = ["T", "", "x"]
    assert _tf_str(template.query_tf(tf.constant(texts))) == [template.query(t) for t in texts]
    rendered = template.document_tf(tf.constant([texts]), tf.constant([titles]))  # rank 2 works too
    assert rendered.shape == (1, 3)
    assert _tf_str(rendered) == [template.document(t, ti) for t, ti in zip(texts, titles)]
    assert _tf_str(template.document_tf(tf.constant("z"))) == [template.document("z")]


def test_unknown_fields_are_rejected():
    with pytest.raises(ValueError, match="unknown field"):
        templates.PromptTemplate("x", query_format="{task} {query}")
    with pytest.raises(ValueError, match="must contain"):
        templates.PromptTemplate("x", document_format="title: {title}")
    with pytest.raises(ValueError, match="unknown task kind"):
        templates.default_template("astrology")


def test_overrides_per_task():
    default = templates.default_template("search")
    assert templates.resolve_template("my_task", default) is default
    overrides = {"my_task": {"task_description": "web search", "empty_title": "-"}}
    changed = templates.resolve_template("my_task", default, overrides)
    assert changed.query("q") == "task: web search | query: q"
    assert changed.document("d") == "title: - | text: d"
    assert templates.resolve_template("other_task", default, overrides) is default
    whole = templates.PromptTemplate("x", query_format="{text}")
    assert templates.resolve_template("my_task", default, {"my_task": whole}) is whole


def test_bad_override_names_the_fields():
    with pytest.raises(ValueError, match="PromptTemplate does not have"):
        templates.resolve_template("t", templates.default_template("search"),
                                   {"t": {"prompt": "x"}})


def test_gin_overrides_reach_the_registered_task(byte_vocab):
    """gin binds SeqioData.templates; the run's tasks are registered with them resolved."""
    import seqio

    from gemb.data import mixtures, tasks
    from gemb.train import gin_registry

    gin_registry.register()
    with gin.unlock_config():
        gin.parse_config("SeqioData.templates = {'gemb_docstring_code': "
                         "{'document_format': 'code: {text}'}}")
    try:
        data = gin.get_configurable("SeqioData")()
    finally:
        gin.clear_config()
    mixtures.build_mixture(byte_vocab, name="gemb_quickstart",
                           template_overrides=data.templates)
    task = seqio.TaskRegistry.get(tasks.DOCSTRING_CODE)
    template = task.preprocessors[0].keywords["template"]
    assert template.document("def f(): pass") == "code: def f(): pass"
    mixtures.build_mixture(byte_vocab, name="gemb_quickstart")  # the default again
    task = seqio.TaskRegistry.get(tasks.DOCSTRING_CODE)
    assert task.preprocessors[0].keywords["template"] == templates.default_template("code_retrieval")
