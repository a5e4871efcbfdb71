"""Mistakes in using ``gm.open`` get a message that says what to write instead."""

from __future__ import annotations

from pathlib import Path

import pytest

import gm


async def test_a_store_used_without_await_says_how_to_open_it(tmp_path: Path) -> None:
    mem = gm.open(tmp_path / "mem.db")
    with pytest.raises(AttributeError, match=r"async with gm.open\(...\) as mem:.*mem = await gm.open"):
        await mem.add("Prefers window seats.")  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="has no .search"):
        mem.search  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'frobnicate'"):
        mem.frobnicate  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(TypeError, match=r"asynchronous: write `async with gm.open"), mem:  # type: ignore[attr-defined]
        pass
    assert not (tmp_path / "mem.db").exists()  # nothing was opened
    async with mem as store:  # the same opener, used as it should be, works
        assert (await store.add("Prefers window seats.")).text == "Prefers window seats."


@pytest.mark.parametrize("url", ["http://127.0.0.1:8420", "https://memory.example.com/", "mysql://db/mem"])
def test_a_url_that_is_not_a_database_names_gm_connect(url: str, tmp_path: Path) -> None:
    with pytest.raises(gm.errors.InvalidInput) as refused:
        gm.open(url)
    assert "not a database" in refused.value.message
    if url.startswith("http"):
        assert f"async with gm.connect({url!r}, api_key=...) as mem:" in refused.value.message
    else:
        assert "gm.connect" not in refused.value.message
    assert not Path("http:").exists()


async def test_a_closed_store_cannot_be_opened_again_and_leaves_the_file_free(tmp_path: Path) -> None:
    from gm.errors import StoreClosed

    store = await gm.open(tmp_path / "mem.db")
    await store.close()
    with pytest.raises(StoreClosed, match="open it again with gm.open"):
        await store.open()
    async with gm.open(tmp_path / "mem.db") as again:  # nothing of the refused open holds the lock
        assert (await again.stats()).memories == 0
