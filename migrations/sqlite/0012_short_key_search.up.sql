-- An index for the key search's needles of one or two characters, which the trigram index of 0008
-- cannot look up: without it a rare one (`zq`) reads every key. For each key, every substring of one
-- and of two characters of its name and of its owner id, ASCII letters folded as the search folds
-- them (`lower`: SQLite's folds ASCII only), is a token of an FTS5 table keyed by api_keys' rowid, as
-- 0008's table is. A token is the substring's UTF-8 bytes in hex, so the tokenizer keeps every
-- character (spaces, punctuation, `%`, quotes) and folds none. A needle finds its candidates as one
-- token; the search applies its own predicate to them.
--
-- Contentless (only the index is stored), `contentless_delete` so that a key's row can be deleted
-- and replaced by its rowid, `detail = 'none'`: only which keys hold a token, the smallest index.
-- Triggers keep it in step with every insert, rename and delete, from the view of each key's tokens.
-- The substrings are computed in SQL without a WITH clause (a trigger takes none): `json_each` over an
-- array of `length(text)` zeros numbers the positions.
CREATE VIRTUAL TABLE api_keys_grams USING fts5 (
    grams, content = '', contentless_delete = 1, detail = 'none', tokenize = 'unicode61'
);

CREATE VIEW api_keys_grams_of AS
SELECT k.rowid AS key_rowid, (
    SELECT group_concat(hex(gram), ' ') FROM (
        SELECT DISTINCT substr(text.value, position.key + 1, width.value) AS gram
        FROM json_each(json_array(lower(k.name), lower(k.owner_id))) AS text,
             json_each('[' || substr(replace(hex(zeroblob(length(text.value))), '00', ',0'), 2) || ']') AS position,
             json_each('[1, 2]') AS width
        WHERE text.type = 'text' AND position.key + width.value <= length(text.value)
    )
) AS grams
FROM api_keys AS k;

CREATE TRIGGER api_keys_grams_insert AFTER INSERT ON api_keys BEGIN
    INSERT INTO api_keys_grams (rowid, grams)
    SELECT key_rowid, grams FROM api_keys_grams_of WHERE key_rowid = new.rowid;
END;

CREATE TRIGGER api_keys_grams_delete AFTER DELETE ON api_keys BEGIN
    DELETE FROM api_keys_grams WHERE rowid = old.rowid;
END;

CREATE TRIGGER api_keys_grams_update AFTER UPDATE OF name, owner_id ON api_keys
WHEN old.name IS NOT new.name OR old.owner_id IS NOT new.owner_id BEGIN
    DELETE FROM api_keys_grams WHERE rowid = old.rowid;
    INSERT INTO api_keys_grams (rowid, grams)
    SELECT key_rowid, grams FROM api_keys_grams_of WHERE key_rowid = new.rowid;
END;

-- The keys already there.
INSERT INTO api_keys_grams (rowid, grams) SELECT key_rowid, grams FROM api_keys_grams_of;
