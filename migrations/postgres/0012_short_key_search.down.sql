-- Reverts 0012: a needle of one or two characters reads every key again when it is rare.
DROP INDEX IF EXISTS api_keys_search_grams;
DROP FUNCTION IF EXISTS api_keys_search_grams(text, text);
