"""scripts/app.py, the web demo: batched captioning, upload errors, explain figures, the Space, and a real browser.

The browser test drives Debian's headless Chromium through selenium (tools/app_screenshot.py holds the helpers).
Without Chromium it is skipped, with the command that installs it; with `FSGR_PMA_REQUIRE_BROWSER=1` (which `.ci/run`
sets, after installing Chromium) a missing browser fails the run instead, so CI always drives the real page.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import urllib.request
from pathlib import Path

import gradio
import pytest
import torch
from huggingface_hub import SpaceCard
from packaging.requirements import Requirement
from PIL import Image
from selenium.webdriver.common.by import By

from scripts import app, push_to_hub
from tools import app_screenshot
from conftest import fill_memory
from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration
from modeling_fsgr_pma.cli.main import Result, caption_images, load_image
from modeling_fsgr_pma.cli.loading import UNKNOWN_TRAINING_DATA, load_pretrained, training_data
from modeling_fsgr_pma.processing_fsgr_pma import FsgrPmaProcessor
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "scripts" / "app.py"
EXAMPLES = sorted((ROOT / "scripts" / "app_examples").glob("*.png"))
BROKEN_REASON = "not an image or unreadable header"  # what `fsgr-pma caption` prints for a text file
CAPTIONS = ["a red circle above a blue square", "two green stars on a white background", "a small black ring"]
helpers = app_screenshot  # browser driving, app subprocesses


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The demo's architecture (configuration/model/tiny.json), random weights, refreshed prototypes."""
    directory = tmp_path_factory.mktemp("demo_model")
    tokenizer = train_caption_tokenizer(CAPTIONS * 5, vocab_size=128)
    config = FsgrPmaConfig.from_json_file(ROOT / "configuration" / "model" / "tiny.json")
    config = FsgrPmaConfig(**{**config.to_dict(), "vocab_size": len(tokenizer), "dropout": 0.0})
    torch.manual_seed(0)
    model = FsgrPmaForConditionalGeneration(config)
    fill_memory(model)
    # An untrained model tends to repeat <bos>; keep special tokens out so captions are words.
    model.generation_config.suppress_tokens = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id]
    model.generation_config.min_new_tokens = 2
    model.generation_config.num_beams, model.generation_config.max_new_tokens = 2, 6
    model.save_pretrained(directory)
    FsgrPmaProcessor.for_config(model.config, tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def captioner(model_dir):
    model, processor = load_pretrained(str(model_dir))
    return app.Captioner(model, processor, "cpu", batch_size=16, max_images=8, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, str]:
    """Three good images with distinct names, a text file named .png, and an image over the pixel limit."""
    folder = tmp_path_factory.mktemp("uploads")
    paths = {}
    for index, source in enumerate(EXAMPLES[:3]):
        paths[f"good{index}"] = str(folder / f"good_{index}.png")
        Image.open(source).save(paths[f"good{index}"])
    paths["broken"] = str(folder / "broken.png")
    Path(paths["broken"]).write_text("this is not a picture\n")
    paths["huge"] = str(folder / "huge.png")
    Image.new("RGB", (1100, 1000), "blue").save(paths["huge"])  # 1.1 MP > max_pixels
    return paths


def _gallery(*paths: str) -> list[tuple[str, None]]:
    """What Gradio's Gallery(type="filepath") hands a function."""
    return [(path, None) for path in paths]


def _expected_caption(captioner, path: str, num_beams: int, max_new_tokens: int) -> str:
    image = load_image(path, None)
    return caption_images(captioner.model, captioner.processor, [image], 1, num_beams, max_new_tokens, "cpu")[0]


def _cli_reason(path: str, max_pixels: int | None = None) -> str:
    """The reason `fsgr-pma caption` prints after `ERROR: ` for a bad file."""
    with pytest.raises(ValueError) as info:
        load_image(path, max_pixels)
    return str(info.value).removeprefix(f"{path}: ")


# ----------------------------------------------------------------------------------------------------------------
# The functions behind the page
def test_examples_are_bundled():
    assert len(EXAMPLES) >= 3
    assert app.example_images(APP.parent / "app_examples") == [str(path) for path in EXAMPLES]


def test_caption_batch_pools_requests_by_setting(captioner, uploads, monkeypatch):
    calls = []
    generate = captioner.model.generate

    def counting_generate(**kwargs):
        calls.append((kwargs["pixel_values"].shape[0], kwargs["num_beams"], kwargs["max_new_tokens"]))
        return generate(**kwargs)

    monkeypatch.setattr(captioner.model, "generate", counting_generate)
    galleries = [
        _gallery(uploads["good0"], uploads["broken"]),
        _gallery(uploads["good1"], uploads["huge"]),
        None,  # pressed Caption with no image
        _gallery(uploads["good2"]),
        _gallery(*[uploads["good0"]] * 9),  # more than max_images
    ]
    (pages,) = captioner.caption_batch(galleries, [2, 2, 3, 1, 2], [5, 5, 5, 4, 5])
    assert len(pages) == len(galleries)
    # Two settings with images (beam 2 / 5 tokens: two requests' good images together; beam 1 / 4 tokens): two calls.
    assert sorted(calls) == [(1, 1, 4), (2, 2, 5)]

    first, second, empty, third, too_many = pages
    assert first.splitlines() == [
        f"- **good\\_0\\.png**: {app.escape_markdown(_expected_caption(captioner, uploads['good0'], 2, 5))}",
        f"- **broken\\.png**: ⚠️ ERROR: {app.escape_markdown(_cli_reason(uploads['broken']))}",
    ]
    assert BROKEN_REASON in first
    huge_reason = _cli_reason(uploads["huge"], max_pixels=1_000_000)
    assert "exceeds the limit" in huge_reason and app.escape_markdown(huge_reason) in second.splitlines()[1]
    assert app.escape_markdown(_expected_caption(captioner, uploads["good2"], 1, 4)) in third
    assert "Upload" in empty and "Traceback" not in "".join(pages)
    assert "at most 8" in too_many


def test_results_markdown_escapes_names_and_marks_empty_captions():
    text = app.results_markdown([
        Result(file="a_b*[1].png", caption="a red circle"),
        Result(file="c.png", error="zero-byte file"),
        Result(file="d.png", caption=""),
    ])
    assert text.splitlines() == [
        r"- **a\_b\*\[1\]\.png**: a red circle",
        r"- **c\.png**: ⚠️ ERROR: zero\-byte file",
        r"- **d\.png**: *(empty caption)*",
    ]


def test_explain_figures_only_on_request(captioner, uploads):
    hidden = captioner.explain_figures(_gallery(uploads["good0"]), 5, False)
    assert hidden["visible"] == "hidden" and hidden["value"] is None
    shown = captioner.explain_figures(_gallery(uploads["good0"], uploads["broken"]), 5, True)
    assert shown["visible"] is True and len(shown["value"]) == 1  # the broken upload has no figure
    figure, label = shown["value"][0]
    assert isinstance(figure, Image.Image) and figure.width > 800 and label.startswith("good_0.png: “")


def test_page_queues_captioning_in_batches_and_links_the_card(captioner, tmp_path):
    demo = app.build_demo(captioner, "someone/fsgr-pma-tiny", [], max_batch_size=3, trained_on="Shapes.")
    events = {fn.api_name: fn for fn in demo.fns.values()}
    assert events["caption"].batch and events["caption"].max_batch_size == 3
    assert not events["explain"].batch
    # One model, one job at a time: captioning and explaining share a concurrency group of size 1.
    assert events["caption"].concurrency_id == events["explain"].concurrency_id
    assert events["caption"].concurrency_limit == events["explain"].concurrency_limit == 1
    description = app.model_description("someone/fsgr-pma-tiny", captioner.model.config, 10, "Shapes.")
    assert "[someone/fsgr-pma-tiny](https://huggingface.co/someone/fsgr-pma-tiny) (model card)" in description
    assert "**Trained on:** Shapes. It can only name what it saw there." in description

    assert app.model_card(str(tmp_path)) is None and app.model_card("someone/fsgr-pma-tiny") is None
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# A card\n")
    assert app.model_card(str(tmp_path)) == "\n# A card\n"


def test_parse_args_model_from_space_readme(tmp_path):
    readme = tmp_path / "README.md"
    assert app.space_model(readme) is None
    readme.write_text("---\nsdk: gradio\napp_file: app.py\nmodels:\n- someone/fsgr-pma-tiny\n---\n\nA Space.\n")
    assert app.space_model(readme) == "someone/fsgr-pma-tiny"
    with pytest.raises(SystemExit):
        app.parse_args([])  # scripts/ has no README.md: --model is required
    with pytest.raises(SystemExit):
        app.parse_args(["--model", "x", "--max-images", "0"])


def test_unloadable_model_exits_2_before_serving(tmp_path, caplog):
    assert app.main(["--model", str(tmp_path / "no_such_model"), "--port", "9"]) == 2
    assert "model directory not found" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# The page in a real browser
REQUIRE_BROWSER = "FSGR_PMA_REQUIRE_BROWSER"


def require_browser() -> None:
    """Skip where Chromium is missing, saying how to install it; fail instead when `FSGR_PMA_REQUIRE_BROWSER=1`."""
    try:
        helpers.find_browser()
    except helpers.BrowserMissingError as error:
        message = f"the browser test needs Chromium: {error}"
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{message} ({REQUIRE_BROWSER}=1)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def chromium() -> None:
    require_browser()


@pytest.mark.parametrize("required", [False, True], ids=["skipped", "required"])
def test_missing_browser_skips_or_fails(monkeypatch, required):
    monkeypatch.setattr(helpers, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv(REQUIRE_BROWSER, "1" if required else "0")
    expected = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(expected, match="apt-get update && apt-get install -y chromium chromium-driver"):
        require_browser()


@pytest.fixture(scope="module")
def served(captioner, model_dir):
    """The app's page, served by this process on a free local port; closed afterwards."""
    demo = app.build_demo(captioner, str(model_dir), app.example_images(APP.parent / "app_examples"), 4,
                          training_data(str(model_dir)))
    port = helpers.free_port()
    app.serve(demo, "127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_browser_upload_caption_error_example_screenshot(chromium, served, captioner, uploads, tmp_path):
    with helpers.browser(helpers.DESKTOP) as driver:
        helpers.open_page(driver, served)
        assert "FSGR-PMA" in driver.find_element(By.ID, "description").text
        assert "local directory" in driver.find_element(By.ID, "description").text
        assert "Trained on: unknown" in driver.find_element(By.ID, "description").text  # the fixture has no card

        helpers.upload(driver, [uploads["good0"]])
        text = helpers.press_caption(driver, ["good_0.png"])
        caption = _expected_caption(captioner, uploads["good0"], captioner.default_beams, captioner.default_length)
        assert text == f"good_0.png: {caption}"
        assert driver.execute_script("return window.fsgrProgress.captions.seen")  # the progress indicator showed

        helpers.clear_images(driver)
        helpers.upload(driver, [uploads["broken"]])
        text = helpers.press_caption(driver, ["broken.png"])
        assert text == f"broken.png: ⚠️ ERROR: {BROKEN_REASON}"
        assert not driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")  # no error pop-up

        helpers.clear_images(driver)
        helpers.load_example(driver, -1)  # "all of them"
        helpers.wait_for_images(driver, len(EXAMPLES))
        text = helpers.press_caption(driver, [path.name for path in EXAMPLES])
        assert len(text.splitlines()) == len(EXAMPLES) and "ERROR" not in text

        helpers.clear_images(driver)
        helpers.load_example(driver, 0)
        helpers.set_explain(driver, True)
        helpers.press_caption(driver, [EXAMPLES[0].name], figures=True)
        assert helpers.figure_count(driver) == 1

        shot = helpers.screenshot(driver, tmp_path / "app.png")
        with Image.open(shot) as image:
            assert image.format == "PNG" and image.width == helpers.DESKTOP[0]

        driver.set_window_size(*helpers.PHONE)
        assert helpers.page_fits_width(driver)
        button = driver.find_element(By.ID, "caption-button").rect
        results = driver.find_element(By.ID, "captions").rect
        assert results["y"] > button["y"] + button["height"]  # the columns stack on a phone


# ----------------------------------------------------------------------------------------------------------------
# The Space
def _project_dependencies() -> set[str]:
    """Names of the dependencies in pyproject.toml's [project] table (not the extras)."""
    requirements = [Requirement(line) for line in importlib.metadata.requires("fsgr-pma")]
    return {r.name for r in requirements if r.marker is None or "extra" not in str(r.marker)}


def test_space_dry_run_writes_a_space_that_starts(model_dir, tmp_path):
    out = tmp_path / "space"
    push_to_hub.main(["--space", "someone/fsgr-pma-demo", "--repo-id", "someone/fsgr-pma-tiny",
                                     "--dry-run", str(out)])
    assert (out / "app.py").read_bytes() == APP.read_bytes()
    package = ROOT / "modeling_fsgr_pma"
    assert {p.name for p in (out / "modeling_fsgr_pma").glob("*.py")} == {p.name for p in package.glob("*.py")}
    assert sorted(p.name for p in (out / "app_examples").iterdir()) == [p.name for p in EXAMPLES]

    pins = [line for line in (out / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert {line.split("==")[0] for line in pins} == _project_dependencies()
    for line in pins:
        name, version = line.split("==")
        assert version == importlib.metadata.version(name), line
    assert f"gradio=={gradio.__version__}" in pins

    card = SpaceCard.load(out / "README.md")
    assert card.data.sdk == "gradio" and card.data.sdk_version == gradio.__version__
    assert card.data.app_file == "app.py" and card.data.models == ["someone/fsgr-pma-tiny"]
    assert "https://huggingface.co/someone/fsgr-pma-tiny" in card.text

    spec = importlib.util.spec_from_file_location("space_app", out / "app.py")
    space_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(space_app)
    assert space_app.parse_args([]).model == "someone/fsgr-pma-tiny"  # what `python app.py` loads on the Space

    # On this machine (no Hub), the folder's app starts on the local model and serves its page.
    log = tmp_path / "space_app.log"
    with helpers.running_app(out / "app.py", ["--model", str(model_dir)], timeout=600, log=log) as url:
        with urllib.request.urlopen(url + "config", timeout=30) as response:
            config = response.read().decode()
    assert "FSGR-PMA image captioning" in config
    assert "warm-up caption" in log.read_text()  # loaded and warmed up before serving


def test_space_upload_creates_a_gradio_space(monkeypatch):
    push = push_to_hub
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), kwargs))
            return type("Commit", (), {"commit_url": f"https://huggingface.co/spaces/{repo_id}/commit/1"})()

    monkeypatch.setattr(push, "HfApi", FakeApi)
    url = push.main(["--space", "someone/fsgr-pma-demo", "--repo-id", "someone/fsgr-pma-tiny"])
    assert url == "https://huggingface.co/spaces/someone/fsgr-pma-demo/commit/1"
    (create, repo, options), (upload, upload_repo, files, upload_options) = calls
    assert create == "create_repo" and repo == upload_repo == "someone/fsgr-pma-demo"
    assert options["repo_type"] == upload_options["repo_type"] == "space" and options["space_sdk"] == "gradio"
    assert files == ["README.md", "app.py", "app_examples", "modeling_fsgr_pma", "requirements.txt"]
