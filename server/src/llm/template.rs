//! Chat templates: the model's Jinja template (`chat_template.jinja`)
//! rendered with `minijinja`, with the variables and helpers Hugging Face
//! templates expect (`messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`, `raise_exception`, Python string methods).

use minijinja::{Environment, ErrorKind as JinjaErrorKind, Value};
use serde::Serialize;

/// One chat message, as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; a syntax error fails the model load.
    pub(crate) fn new(source: String) -> anyhow::Result<ChatTemplate> {
        let mut env = Environment::new();
        // Hugging Face renders with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(JinjaErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| -> String {
            // Templates use it for "today's date"; UTC, date formats only.
            let days = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() / 86_400)
                .unwrap_or(0) as i64;
            let (y, m, d) = civil_from_days(days);
            format.replace("%Y", &format!("{y:04}")).replace("%m", &format!("{m:02}")).replace("%d", &format!("{d:02}"))
        });
        env.add_template_owned(NAME, source).map_err(|e| anyhow::anyhow!("invalid chat template: {e:#}"))?;
        Ok(ChatTemplate { env })
    }

    /// Renders the prompt for `messages`. Errors (including the template's
    /// own `raise_exception`) are the client's: they say what is wrong.
    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, String> {
        let template = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
            .map_err(|e| match e.detail() {
                Some(detail) if e.kind() == JinjaErrorKind::InvalidOperation => detail.to_string(),
                _ => format!("cannot render the chat template: {e}"),
            })
    }
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as its GGUF carries it.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(text: &str) -> ChatMessage {
        ChatMessage { role: "user".into(), content: text.into() }
    }

    #[test]
    fn chatml_renders_like_transformers() {
        let template = ChatTemplate::new(CHATML.into()).unwrap();
        let prompt = template.render(&[user("Hi")], true, "<|im_start|>", "<|im_end|>").unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let system = ChatMessage { role: "system".into(), content: "Be brief.".into() };
        let prompt = template.render(&[system, user("Hi")], false, "", "").unwrap();
        assert_eq!(prompt, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn raise_exception_and_python_methods() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}{{ bos_token }}{{ messages[0].content.strip() | upper }}{{ eos_token }}";
        let template = ChatTemplate::new(source.into()).unwrap();
        assert_eq!(template.render(&[user("  hi ")], true, "<s>", "</s>").unwrap(), "<s>HI</s>");
        let assistant = ChatMessage { role: "assistant".into(), content: "x".into() };
        assert_eq!(template.render(&[assistant], true, "", "").unwrap_err(), "first message must be from the user");
    }

    #[test]
    fn bad_templates_fail_to_load() {
        assert!(ChatTemplate::new("{% for %}".into()).is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
