//! The Hugging Face environment variables, as a user sets them: HF_HUB_OFFLINE, HF_HUB_CACHE and
//! HF_HOME steer where `pretrained::apply_configs` and `pretrained::build` find a model. One test in its
//! own binary, because it changes the process environment.

use std::path::Path;

use candle_core::Device;
use clip_core::hub::Hub;
use clip_core::pretrained;
use clip_core::ClipConfig;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn offline_loading_follows_hf_hub_cache_and_hf_home() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pretrained/hub");
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    copy_dir(&fixtures, &cache);
    let config = home.path().join("clip.toml");
    std::fs::write(
        &config,
        "preset = \"tiny\"\n\n[image]\npretrained = \"clipmine-test/tiny-resnet-basic\"\n\n[text]\npretrained = \"clipmine-test/tiny-bert@main\"\npooling = \"mean\"\n\n[data]\nmax_length = 32\n",
    )
    .unwrap();

    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HOME", home.path().join("elsewhere"));
    assert_eq!(Hub::from_env().cache_dir(), cache);
    assert!(Hub::from_env().is_offline());
    // The config is pure data; the program applies the pretrained towers' own configs.
    let resolve = |config: &std::path::Path| -> anyhow::Result<ClipConfig> {
        let mut cfg = ClipConfig::resolve(Some(config), None)?;
        pretrained::apply_configs(&mut cfg, &Hub::from_env())?;
        Ok(cfg)
    };
    let cfg = resolve(&config).unwrap();
    assert_eq!(
        (cfg.text.dim, cfg.image.feature_dim(), cfg.image.image_size),
        (24, 32, 224)
    );
    let (model, report) = pretrained::build(&cfg, &Device::Cpu).unwrap();
    assert_eq!(report.towers.len(), 2);
    assert!(report.towers.iter().all(|t| t.file.starts_with(&cache)));
    let (tok, _) = pretrained::tokenizer(&cfg, &Hub::from_env()).unwrap().unwrap();
    let probe = pretrained::probe(&model, Some(&tok)).unwrap();
    assert_eq!(probe.token_ids.as_deref(), Some(&[2u32, 5, 6, 7, 5, 9, 3][..]));
    assert_eq!(probe.text.as_ref().map(Vec::len), Some(8));
    assert_eq!(probe.image.len(), 8);

    // Without HF_HUB_CACHE, the cache is $HF_HOME/hub.
    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HOME", home.path());
    assert_eq!(Hub::from_env().cache_dir(), cache);
    resolve(&config).unwrap();

    // Offline, a model that is not cached is an error naming the cache folder it looked in.
    std::fs::write(&config, "[text]\npretrained = \"someone/not-cached\"\n").unwrap();
    let err = format!("{:#}", resolve(&config).unwrap_err());
    assert!(
        err.contains(&cache.join("models--someone--not-cached").display().to_string()),
        "{err}"
    );
    assert!(err.contains("huggingface-cli download someone/not-cached"), "{err}");
}
