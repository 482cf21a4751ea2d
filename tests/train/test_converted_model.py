"""gin's converted_model(): the embedded model converted into the cache once, also when several
callers ask at the same time (threads of one process, a sweep's parallel runs); the processes of
one job converting together are tested in tests/multiprocess/test_model_conversion.py."""

import threading

import pytest

from gemb.checkpoints import convert, model_dir
from gemb.train import gin_registry


@pytest.fixture
def tiny_source(tmp_path):
    from tiny_checkpoints import write_tiny_hf_checkpoint, write_word_level_tokenizer

    source = tmp_path / "hf"
    write_tiny_hf_checkpoint(source)
    write_word_level_tokenizer(source)
    return str(source)


def _is_model_folder(folder):
    return ((folder / model_dir.CONFIG_FILENAME).is_file()
            and (folder / model_dir.PARAMS_DIRNAME).is_dir())


def test_concurrent_threads_get_one_finished_folder_converted_once(tmp_path, tiny_source,
                                                                    capsys):
    out = tmp_path / "cache" / "tiny"
    results, errors = [], []

    def convert_once():
        try:
            results.append(gin_registry.converted_model(tiny_source, folder=str(out)))
        except Exception as error:  # noqa: BLE001 - the test reports any failure
            errors.append(error)

    threads = [threading.Thread(target=convert_once) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    # One conversion: orbax saves from several threads of one process interfere (CI of 5616adf).
    assert capsys.readouterr().out.count("Converting") == 1
    assert results == [str(out)] * 3 and _is_model_folder(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no staging folder left
    config, _ = model_dir.read_model_config(out)
    assert config.transformer.num_layers > 0


def test_a_process_that_loses_the_race_uses_the_winners_folder(tmp_path, tiny_source,
                                                               monkeypatch):
    out = tmp_path / "cache" / "tiny"
    real_convert = convert.convert

    def convert_while_another_process_finishes(name, folder, **kwargs):
        real_convert(name, out, **kwargs)  # the other process, done first
        (out / "winner").write_text("")
        return real_convert(name, folder, **kwargs)

    monkeypatch.setattr(convert, "convert", convert_while_another_process_finishes)
    assert gin_registry.converted_model(tiny_source, folder=str(out)) == str(out)
    assert (out / "winner").exists()  # the finished folder was kept, not replaced
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_an_incomplete_folder_from_a_crash_is_replaced(tmp_path, tiny_source):
    out = tmp_path / "cache" / "tiny"
    (out / model_dir.PARAMS_DIRNAME).mkdir(parents=True)  # no config: a crashed conversion
    assert gin_registry.converted_model(tiny_source, folder=str(out)) == str(out)
    assert _is_model_folder(out)


def test_a_failed_conversion_leaves_no_staging_folder(tmp_path, tiny_source, monkeypatch):
    out = tmp_path / "cache" / "tiny"
    real_convert = convert.convert

    def convert_then_fail(name, folder, **kwargs):
        real_convert(name, folder, **kwargs)  # a half-written folder, as a crash midway leaves
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "convert", convert_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        gin_registry.converted_model(tiny_source, folder=str(out))
    assert list(out.parent.iterdir()) == []  # neither the model nor a staging folder
